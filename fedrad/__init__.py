"""fedrad: federated radiomics for multi-center validation studies.

Sub-packages: ``fedrad.common`` (pure math and message schemas), ``fedrad.client`` (site agent),
``fedrad.server`` (coordinator), ``fedrad.cli`` (the ``fedrad`` command, the only module that sees both client and server).
"""
from importlib.metadata import PackageNotFoundError, version as _v

try:
    __version__ = _v("fedrad")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
