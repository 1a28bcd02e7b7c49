"""The generated extraction jobs, submitted to a real Slurm: PBS scripts through Slurm's qsub, and an sbatch array.

.ci/slurm-up starts a one-node cluster. Without one these tests skip, except where REQUIRE_SLURM=1 (CI) makes
that a failure. The checks look at the feature files themselves: a misconfigured node reports COMPLETED for jobs
that never ran.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import generate_pbs
from conftest import ROOT, extraction_args
from ucf.extraction import clip_stem


def slurm_available():
    if not shutil.which('sinfo') or not shutil.which('qsub') or not shutil.which('sbatch'):
        return 'sinfo/qsub/sbatch not installed (run .ci/slurm-up as root)'
    result = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True)
    if result.returncode or not any(s in result.stdout for s in ('idle', 'mixed', 'allocated')):
        return f'no Slurm node is up ({(result.stderr or result.stdout).strip()}); run .ci/slurm-up as root'
    return None


@pytest.fixture(scope='module')
def slurm():
    reason = slurm_available()
    if reason:
        if os.environ.get('REQUIRE_SLURM') == '1':
            pytest.fail(f'REQUIRE_SLURM=1 but {reason}')
        pytest.skip(reason)


def wait_for(job_ids, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(['squeue', '-h', '-o', '%i', '-j', ','.join(job_ids)], capture_output=True,
                                text=True).stdout.split()
        if not queued:
            return
        time.sleep(1)
    subprocess.run(['scancel', *job_ids])
    pytest.fail(f'jobs {job_ids} still queued after {timeout}s')


def check_outputs(work, written, logs):
    for folder in ('UCF-101_features', 'UCF-101_framePrediction'):
        for rel in written:
            path = os.path.join(work, folder, clip_stem(rel) + '.npy')
            assert os.path.isfile(path), f'{path} missing; job logs:\n' + logs()
            assert np.load(path).shape[0] == written[rel]


def read_logs(*folders):
    """Job output: Slurm writes our --output/-o names; its qsub wrapper may use <script>.o<id>/.e<id>."""
    return '\n'.join(open(os.path.join(d, f)).read() for d in folders for f in sorted(os.listdir(d))
                     if f.endswith('.log') or '.pbs.o' in f or '.pbs.e' in f)


@pytest.mark.parametrize('scheduler', ['pbs', 'slurm'])
def test_jobs_run_under_a_real_scheduler(slurm, scheduler, tiny_ucf, tiny_model, tmp_path):
    _, written = tiny_ucf
    work = tmp_path / 'work'
    work.mkdir()
    jobs = tmp_path / 'jobs'
    options = ['--scheduler', scheduler, '--num-shards', '3', '--walltime', '00:10:00', '--script-dir', str(jobs),
               '--log-dir', str(jobs), '--name', f'test_{scheduler}', '--device', '-1']
    # Slurm's srun stands in for a Cray's aprun: the launcher prefixes every command of the job.
    options += ['--nodes', '1'] if scheduler == 'pbs' else ['--gpus', '0', '--cpus', '1', '--launcher', 'srun -n 1']
    # Submitted with saveFeatures.sh from the work folder, the code living elsewhere, as a user would: the jobs
    # must find it through PBS_O_WORKDIR (empty under Slurm's qsub) or SLURM_SUBMIT_DIR, and write there.
    cmd = [os.path.join(ROOT, 'saveFeatures.sh'), *options, '--', *extraction_args(tiny_ucf, tiny_model, '.')]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr
    job_ids = [line.split()[-1] for line in result.stdout.splitlines() if line and not line.startswith('$')]
    assert len(job_ids) == (3 if scheduler == 'pbs' else 1), result.stdout
    wait_for(job_ids)
    check_outputs(str(work), written, lambda: read_logs(jobs, work))
    logs = read_logs(jobs, work)
    assert all(f'shard {k} of 3 on' in logs for k in range(3)), logs


def test_dry_run_prints_scripts_without_submitting(tmp_path, capsys):
    ids = generate_pbs.main(['--dry-run', '--script-dir', str(tmp_path / 'jobs'), '--queue', 'normal',
                             '--module', 'bwpy', '--', '--split', '2'])
    out = capsys.readouterr().out
    assert ids == [''] * 12 and not (tmp_path / 'jobs').exists()
    assert out.count('#PBS -l walltime=02:30:00') == 12 and out.count('$ qsub ') == 12
    assert '#PBS -q normal' in out and 'module load bwpy' in out and '--split 2' in out
    assert 'PBS_O_WORKDIR:-${SLURM_SUBMIT_DIR' in out and 'PBS_ARRAYID:-${SLURM_ARRAY_TASK_ID:-11}' in out
    generate_pbs.main(['--dry-run', '--scheduler', 'slurm', '--partition', 'gpu'])
    out = capsys.readouterr().out
    assert '#SBATCH --array=0-11' in out and '#SBATCH --gres=gpu:1' in out and '$ sbatch ' in out


def test_cray_job_layout(capsys):
    """Blue Waters: aprun before every command, the interpreter as shell words, setup and modules in the order
    given (the module system's init script first)."""
    generate_pbs.main(['--dry-run', '--num-shards', '1', '--doctor', '--launcher', 'aprun -n 1 -N 1',
                       '--python', 'python3 -u', '--setup', 'source /opt/modules/default/init/bash', '--module',
                       'bwpy', '--setup', 'export HDF5_USE_FILE_LOCKING=FALSE', '--nodes', '1:ppn=16:xk'])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines.index('source /opt/modules/default/init/bash') < lines.index('module load bwpy') < lines.index(
        'export HDF5_USE_FILE_LOCKING=FALSE')
    assert sum(line.startswith('aprun -n 1 -N 1 python3 -u /') for line in lines) == 2  # doctor and the shard
    assert '#PBS -l nodes=1:ppn=16:xk' in out


def test_preflight_says_what_is_missing_before_writing(tiny_ucf, tiny_model, tmp_path):
    """No scheduler command, no model, no data: one line, exit 1, no job script written."""
    root, _ = tiny_ucf
    data = ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist')]
    generator = [sys.executable, os.path.join(ROOT, 'generate_pbs.py'), '--script-dir', str(tmp_path / 'jobs'),
                 '--log-dir', str(tmp_path / 'jobs')]
    cases = [(['--scheduler', 'pbs', '--', *data, '--model', tiny_model], {'PATH': os.path.dirname(sys.executable)},
              'qsub not found on PATH'),
             (['--scheduler', 'local', '--', *data, '--model', str(tmp_path / 'none.model')], {},
              'none.model: fine-tuned model not found'),
             (['--scheduler', 'local', '--', '--data', str(tmp_path / 'nowhere'), *data[2:], '--model', tiny_model],
              {}, 'data folder not found')]
    for options, env, expected in cases:
        result = subprocess.run([*generator, *options], capture_output=True, text=True, cwd=tmp_path,
                                env=dict(os.environ, **env))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
        assert not (tmp_path / 'jobs').exists()


@pytest.mark.parametrize('device,doctor_args', [('0', '--quick --device 0 --require-gpu'),
                                                ('@cupy:1', '--quick --device 1 --require-gpu'),
                                                ('-1', '--quick --device 0\n'), ('@numpy', '--quick --device 0\n')])
def test_doctor_runs_first_in_every_job(capsys, device, doctor_args):
    """With --doctor, each job checks its node before its shard (set -e stops the job if the node is not ready)."""
    generate_pbs.main(['--dry-run', '--doctor', '--num-shards', '2', '--device', device])
    out = capsys.readouterr().out
    assert out.count('doctor.py ' + doctor_args) == 2, out
    assert out.index('doctor.py') < out.index('saveFeatures_1024.py --shard')
    generate_pbs.main(['--dry-run', '--num-shards', '2'])
    assert 'doctor.py' not in capsys.readouterr().out
