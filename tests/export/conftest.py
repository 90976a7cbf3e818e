"""Export tests: one directory of exports shared by the test modules of this folder."""

import pytest


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("exports"))
