"""Integrations with engines that run the models: transformers' serving paths (``transformers``), vLLM
(``vllm``), torch.distributed (``distributed``)."""
