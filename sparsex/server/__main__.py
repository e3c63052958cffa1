"""``python -m sparsex.server`` = ``sparsex serve``."""

from sparsex.server.cli import add_serve_arguments, main, serve_main

__all__ = ["add_serve_arguments", "main", "serve_main"]

if __name__ == "__main__":
    main()
