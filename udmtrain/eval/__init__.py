"""Evaluation library: NELBO perplexity (``ppl``), generative perplexity under a judge (``gen_ppl``,
the only transformers importer), generative frontiers (``frontier``) and the LOO probe (``probe``).

Submodules are imported explicitly (``from udmtrain.eval.ppl import estimate_nelbo``) so that
``import udmtrain.eval`` stays free of transformers / matplotlib.
"""
