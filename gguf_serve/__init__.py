"""gguf-serve: one GGUF language model behind the OpenAI HTTP API.

Nothing is imported here: the render process (template_process) imports this package, and
its memory limit is measured with only jinja2, msgspec and templates loaded.
"""
