"""The built-in protocols; importing this package registers them (``registry``)."""

from decsim.protocols import dpsgd, fedavg, fedprox, gossip, modest, scaffold  # noqa: F401 - registration
