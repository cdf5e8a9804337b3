#!/usr/bin/bash
#SBATCH --job-name=convert
{
  model_path="/models/Meta-Llama-3-8B-Instruct"
  num_experts=7
  num_residual=1
  top_k=1
  scale_factor=4.0   # we suggest this value to be 4.0 for 8 experts
  num_moe_contract_layers=1
  moe_implementation_type="modulelist"
  save_path="/out/Top${top_k}-Scale${scale_factor}"
  neuron_indices_file="/res/neuron_indices.pt"
 srun python smoe/entrypoint/expert_construction/convert/convert_mixtral_v2.py --model_path ${model_path}
}
