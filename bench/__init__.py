"""kvstore's benchmarks: one module per benchmark, each with add_cli_args(parser) and main(args).

Imported as the package ``kvstore._bench`` (see kvstore/_locate.py), never as top-level ``bench``.
"""
