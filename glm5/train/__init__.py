"""Training: pretraining, the DSA stages (dense warm-up, sparse), SFT; the `glm5 train` and `glm5 demo` pipelines.

    glm5 demo                                              # the CPU speedrun, see glm5/demo.py
    glm5 train pretrain --data corpus.jsonl --out runs/pt  # one stage, see glm5/train/cli.py

Modules: data (loaders, packing, sharded resumable batches), corpus + conversations (the embedded demo data),
optim (AdamW, Muon, schedules), losses (LM, MTP, MoE balance, indexer KL), moe_balance (router-bias update),
trainer (the loop, checkpoints, metrics), checkpoints, parallel (DDP / FSDP2), evaluate, report, resources.
Importing this package imports nothing heavy.
"""
