"""`python -m sslpipe ...` (and `accelerate launch -m sslpipe train ...`) is the `sslpipe` command."""
from sslpipe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
