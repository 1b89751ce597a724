"""experiments/colab_tpu.ipynb executes from top to bottom (nbclient, a real kernel), in
its smoke mode on the CPU: the install cell skipped, the recipe command run on a copy of
the session's finished smoke run (so the command resumes it and writes the report, rather
than training again), the report's plots shown and the chat cell answering."""

import os
import shutil

import nbclient
import nbformat
import pytest

import helpers
import xla_test_flags

NOTEBOOK = os.path.join(helpers.ROOT, 'experiments', 'colab_tpu.ipynb')


@pytest.mark.slow
def test_colab_notebook_runs_in_smoke_mode(smoke_run, tmp_path, monkeypatch):
  workdir = tmp_path / 'colab'
  shutil.copytree(smoke_run[0], workdir)
  for name, value in {'JAXGPT_NOTEBOOK_SMOKE': '1', 'JAXGPT_NOTEBOOK_SKIP_INSTALL': '1',
                      'JAXGPT_ROOT': helpers.ROOT, 'JAXGPT_NOTEBOOK_WORKDIR': str(workdir),
                      'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_test_flags.flags()}.items():
    monkeypatch.setenv(name, value)  # the kernel and its children inherit them
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'skipping the install' in text and '| cpu' in text and 'WARNING: no TPU' in text
  assert '[ppo] already at step' in text  # the command ran the recipe (resumed, finished)
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  # plots/: best_of_n, grpo, losses, ppo, ppo_checker
  assert len(images) == 5, text
  assert any('Markdown' in str(o.get('data', {}).get('text/plain', '')) or
             'text/markdown' in o.get('data', {}) for o in outputs)
  assert text.count('assistant>') == 3, text
