"""elastiserve: a Triton-compatible inference engine and an EAS-style elastic serving platform."""

__version__ = "0.1.0"
SERVER_NAME = "elastiserve"
# The Triton release whose protocol surface we mirror (reported in server metadata as Triton does).
TRITON_COMPAT_VERSION = "2.51.0"
