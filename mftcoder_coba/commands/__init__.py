"""The ``mftcoder-coba`` sub-commands, one module each: ``add_arguments(parser)`` and ``main(args)``, parsing
arguments and calling the library; what a command does is documented and tested where it is implemented."""
