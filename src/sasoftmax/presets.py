"""Run presets: sizes and budgets of the harness's training runs.

- ``smoke``: seconds on a CPU; what the tests train.
- ``quick``: about 20 seconds per run on a 2-core CPU, so that ``sasoftmax compare --preset quick``
  (36 runs plus evaluation and analyses, two at a time) finishes in minutes.
- ``gpu``: the mid size (6 layers, width 384, 6 heads, training length 512, 1000 steps of 32 sequences),
  where SA-Softmax's verdict differs from the quick preset's; meant for one GPU, several runs at once.
- ``paper``: a GPT-NeoX-125M-like model (12 layers, width 768, 12 heads) at training length 512, as in
  the SA-Softmax and DAPE experiments; meant for GPUs (use ``torchrun`` to scale out).

Each preset is a complete run config except for the attention choices (normalizer, ssmax, pos), seed
and data, which :func:`sasoftmax.train.make_config` fills in; every key can be overridden there.
``steps`` is where training stops and ``decay_steps`` the horizon of the cosine schedule (None = steps),
so a run can be stopped early and extended with ``--resume`` on the same schedule.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "smoke": {
        "n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": None, "mlp_ratio": 4, "dropout": 0.0,
        "pos_width": 16, "seq_len": 32, "batch_size": 4, "grad_accum": 1, "steps": 8, "decay_steps": None,
        "lr": 3e-3, "min_lr": 3e-4, "warmup": 2, "weight_decay": 0.1, "grad_clip": 1.0,
        "log_every": 1, "checkpoint_every": 4, "eval_lengths": [32, 64, 128], "eval_tokens": 4096,
    },
    "quick": {
        "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": None, "mlp_ratio": 4, "dropout": 0.0,
        "pos_width": 32, "seq_len": 128, "batch_size": 16, "grad_accum": 1, "steps": 400, "decay_steps": None,
        "lr": 2e-3, "min_lr": 2e-4, "warmup": 40, "weight_decay": 0.1, "grad_clip": 1.0,
        "log_every": 10, "checkpoint_every": 100, "eval_lengths": [128, 256, 512, 1024], "eval_tokens": 32768,
    },
    "gpu": {
        "n_layer": 6, "n_embd": 384, "n_head": 6, "n_kv_head": None, "mlp_ratio": 4, "dropout": 0.0,
        "pos_width": 32, "seq_len": 512, "batch_size": 32, "grad_accum": 1, "steps": 1000, "decay_steps": None,
        "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "weight_decay": 0.1, "grad_clip": 1.0,
        "log_every": 10, "checkpoint_every": 250, "eval_lengths": [512, 1024, 2048, 4096], "eval_tokens": 131072,
    },
    "paper": {
        "n_layer": 12, "n_embd": 768, "n_head": 12, "n_kv_head": None, "mlp_ratio": 4, "dropout": 0.0,
        "pos_width": 32, "seq_len": 512, "batch_size": 32, "grad_accum": 1, "steps": 50000, "decay_steps": None,
        "lr": 6e-4, "min_lr": 6e-5, "warmup": 2000, "weight_decay": 0.1, "grad_clip": 1.0,
        "log_every": 50, "checkpoint_every": 1000, "eval_lengths": [512, 1024, 2048, 4096], "eval_tokens": 1048576,
    },
}
