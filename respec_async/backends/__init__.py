"""Engines under the generator other than the in-house one (respec_async/engine): SGLang on GPUs."""
