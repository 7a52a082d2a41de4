"""Quantization and deployment planning.

    glm5 quantize fp8 IN_DIR OUT_DIR     # block-wise FP8 checkpoint, the layout of GLM-5-FP8
    glm5 plan --preset glm5-744b --weights fp8 --gpu h200

fp8.py      block-wise e4m3 quantize / dequantize, FP8Linear / FP8Experts, in-memory model conversion
convert.py  a checkpoint directory to its FP8 twin, tensor by tensor
plan.py     the deployment planner (weights, KV cache, GPUs, decode bound) and its data file gpus.json
cli.py      `glm5 quantize`

Nothing heavy is imported here: `import glm5.quant` costs nothing.
"""
