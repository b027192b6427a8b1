"""The checkout's entry point, over the installed package `gguf_serve`:

    granian --interface asgi service:app       # the app (gguf_serve.service)
    python service.py                          # the same as `gguf-serve`: HOST, PORT, MODEL
"""

if __name__ == "__main__":
    from gguf_serve.__main__ import main

    main()
else:
    from gguf_serve.service import __getattr__  # noqa: F401  `app`, made when first asked for
