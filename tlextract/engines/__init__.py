"""Generation engines behind one seam: TransformerLens (:mod:`.tl`, the default, with capture for
combined mode) and vLLM (:mod:`.vllm`, a server tlextract starts or one already running).

Whatever generated the tokens, activations are read afterwards from TransformerLens hook names.
"""
