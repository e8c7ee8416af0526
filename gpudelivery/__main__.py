"""`python -m gpudelivery`: the same as the `gpudelivery` command."""

from gpudelivery.cli import main

main()
