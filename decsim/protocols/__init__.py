"""The built-in protocols; importing this package registers them (``registry``)."""

from decsim.protocols import (choco, dpsgd, epidemic, fedavg, fedprox, gossip, modest,  # noqa: F401
                              scaffold)  # registration
