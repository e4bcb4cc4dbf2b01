"""Every implementation registered before collection, so tests parametrised over a registry kind
(`impl.common.registry.names`) cover all of them."""
import impl.experiments.systems  # noqa: F401
