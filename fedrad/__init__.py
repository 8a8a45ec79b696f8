"""fedrad: federated radiomics for multi-center validation studies.

Sub-packages: ``fedrad.common`` (pure math and message schemas), ``fedrad.client`` (site agent),
``fedrad.server`` (coordinator), ``fedrad.cli`` (the ``fedrad`` command, the only module that sees both client and server).
"""


def __getattr__(name: str):
    # looked up on first use: importlib.metadata costs ~35 ms, paid by every process that imports fedrad (the
    # site's pinned ClientApp launcher runs once per message and never needs the version)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("fedrad")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'fedrad' has no attribute {name!r}")
