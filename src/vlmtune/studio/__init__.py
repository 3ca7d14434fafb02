"""`vlmtune studio`: a local web app over the same library calls as the CLI (docs/STUDIO.md).

The server is the standard library's (`http.server`), the page is one static HTML/JS file: nothing to install.
Each page's work is a CLI command's function called with the command line the page shows (`cli_args.py`), so the
studio adds no training, data-checking, estimating, predicting or exporting logic of its own.
"""
