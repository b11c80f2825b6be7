"""Integrations with serving engines: the vLLM KV connector and offload CachePolicy adapter
(:mod:`kvstore.integrations.vllm`) and the LMCache cold tier (:mod:`kvstore.integrations.lmcache`).

Nothing is imported here: vLLM and LMCache are optional extras, loaded only by the module
that needs them.
"""
