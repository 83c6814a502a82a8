"""The ``duplex`` command line."""
