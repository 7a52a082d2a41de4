"""Quantization and deployment planning.

    glm5 quantize fp8 IN_DIR OUT_DIR     # block-wise FP8 checkpoint, the layout of GLM-5-FP8
    glm5 quantize int4 IN_DIR OUT_DIR --method gptq   # or q2 --avg-bits 2.56, or ternary
    glm5 plan --preset glm5-744b --weights fp8 --gpu h200

fp8.py      block-wise e4m3 quantize / dequantize, FP8Linear / FP8Experts, in-memory model conversion
convert.py  a checkpoint directory to its FP8 twin, tensor by tensor
lowbit.py   low-bit arithmetic: bit packing, RTN groups, GPTQ, absmean ternary
calibrate.py  calibration rows from the demo corpus, input Hessians, the q2 mix's bit allocation
lowbit_model.py  QuantLinear / QuantExperts, in-memory conversion, save_quantized / load_quantized_model
lowbit_convert.py  a checkpoint directory to its int4 / q2 / ternary twin (`glm5 quantize int4|q2|ternary`)
load.py     load_any_checkpoint: bf16, FP8 or low-bit by config.json's quantization_config
plan.py     the deployment planner (weights, KV cache, GPUs, decode bound) and its data file gpus.json
cli.py      `glm5 quantize`

Nothing heavy is imported here: `import glm5.quant` costs nothing.
"""
