"""fid.py with tests/test_fid.py's TinyDetector in place of InceptionV3FID, for the two-rank test (its ranks are
processes of their own, which the test's monkeypatch does not reach)."""

import fid
from tests.test_fid import TinyDetector
from training import inception

if __name__ == "__main__":
    inception.InceptionV3FID = TinyDetector
    fid.main()
