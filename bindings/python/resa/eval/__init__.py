# SPDX-License-Identifier: MIT
"""resa.eval: ReSA's quality on a real model (the ``resa-eval`` command, docs/quality.md).

Modules: ``data`` (model and text loading, the GGUF -> transformers converter),
``texts`` (turning the fetched Debian packages into plain text; standard library only),
``metrics`` (NLL, KL, top-1 agreement, the block budget and the K/V bytes formula),
``protocol`` (the teacher-forced lockstep protocol and greedy generation through
resa.hf.ResaLM), ``report`` (tables, CSV, JSON) and ``cli`` (``main()``).
torch and transformers are imported inside the functions that need them.
"""
