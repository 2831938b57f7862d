"""LLM caption rewrites (LaCLIP-style): prompts, backends, validation, the resumable rewrite stage."""  # noqa: E501
