"""Getting models in and out: resolving sources (directory, hub id, GGUF), reading and writing safetensors,
publishing outputs atomically, the embedded models, inspection. Import from the modules."""
