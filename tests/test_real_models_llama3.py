"""The llama3 case of tests/test_real_models.py, in a file of its own so that the suite's two
xdist workers (`--dist loadfile`: whole files per worker) run the two long cases side by
side instead of one after the other."""

import pytest

from tests import test_real_models


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_import_sft_grpo_export_reload_llama3(tmp_path):
  test_real_models.test_import_sft_grpo_export_reload("llama3", tmp_path)
