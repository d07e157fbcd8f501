"""One fuzz target under atheris (libFuzzer, coverage-guided): ``python -m fuzz.run TARGET [libFuzzer flags] DIR...``

The code the target reaches (medvision's reader, preprocessing and receiving paths, pydicom, the multipart
parser) is instrumented for coverage. A finding stops the run with libFuzzer's report and the input saved under
``-artifact_prefix``; ``benchmarks/fuzz.py`` runs this for each target and keeps what it finds.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["medvision", "pydicom", "python_multipart"]):
    import pydicom.encaps  # noqa: F401
    import pydicom.filereader  # noqa: F401
    import pydicom.pixels  # noqa: F401
    import pydicom.values  # noqa: F401
    import python_multipart.multipart  # noqa: F401

    import medvision.dicom_io  # noqa: F401
    import medvision.preprocess  # noqa: F401
    import medvision.resolution  # noqa: F401
    import medvision.serving.stow  # noqa: F401

from fuzz.targets import TARGETS, run  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    name = sys.argv.pop(1)
    import logging
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns on every odd value it meets: that is the point here
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, lambda data: run(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
