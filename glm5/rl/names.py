"""The names `glm5 rl` offers, torch-free so that the command's parser (and `glm5 --help`) loads no torch.

Each is used where it is implemented: ALGOS, KL_ESTIMATORS, MISMATCH_FIXES by `glm5.rl.losses`, MODES by
`glm5.rl.run`, OVERLONG and TRAINER_PARALLEL by `glm5.rl.trainer`.
"""

ALGOS = ("grpo", "gspo", "cispo", "reinforce++")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
MISMATCH_FIXES = ("none", "tis", "icepop")
MODES = ("sync", "async", "april")
OVERLONG = ("keep", "mask", "penalty")
TRAINER_PARALLEL = ("ddp", "fsdp")  # a trainer of several ranks: glm5/train/parallel.py's modes
