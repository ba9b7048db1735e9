"""Tools around the model, not part of it: benchmarks (`bench_segment`, `bench_gpu`, `bench_train`), the committed
test fixtures' generator (`fixtures`), the synthetic world (`synthetic`) and the official-code parity run
(`official_parity`, with `official_side` running inside the official code's own environment, so this package
imports nothing on load), and the training-free heads against NACLIP/SCLIP/ClearCLIP/PEARL's official code
(`heads_parity`, whose `official` subcommand runs in that same environment).
Each runs as `python -m tclseg_trainer.tools.<name>`.
"""
