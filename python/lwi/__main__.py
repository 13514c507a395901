"""`python -m lwi ...` is the `lwi` command."""
from ._cli import main

main()
