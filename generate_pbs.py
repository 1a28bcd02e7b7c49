"""Write one batch job per extraction shard and submit them: PBS (qsub, the handout's), Slurm (sbatch), or local.

    python generate_pbs.py                         # 12 PBS jobs, walltime 02:30:00, one GPU node each
    python generate_pbs.py --scheduler slurm --partition gpu
    python generate_pbs.py --scheduler local       # run the shards here, one after another
    python generate_pbs.py --dry-run               # print the scripts and the submit commands only

Arguments after `--` go to saveFeatures_1024.py unchanged (e.g. `-- --split 2 --batchsize 64`); they are checked
with its own parser first. Run it from the folder that holds the data (UCF-101/, ucfTrainTestlist/,
VGG_1024.model; the code may live elsewhere): the jobs cd to the folder they were submitted from. Before writing
or submitting anything it checks the scheduler's command, the data, the lists and the model.

On a Cray such as Blue Waters (the handout's machine), every command needs the launcher, and the module system
may need its init script first (--setup and --module lines run in the order given):

    python generate_pbs.py --launcher 'aprun -n 1 -N 1' --nodes 1:ppn=16:xk \
        --setup 'source /opt/modules/default/init/bash' --module bwpy --python 'python3'

The PBS scripts also run under Slurm's PBS wrapper (`qsub` from slurm-wlm-torque), where PBS_O_WORKDIR and
PBS_ARRAYID are empty: they fall back to SLURM_SUBMIT_DIR and SLURM_ARRAY_TASK_ID.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from ucf.files import atomic_path
from ucf.flags import DEFAULT_DEVICE, nonnegative_int, positive_int, split_at_dashes
from ucf.runcontrol import exit_on_user_error
from ucf.streams import StreamPath, stream_path

# By absolute path, so that jobs can run in any folder (the one holding the data and outputs).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'saveFeatures_1024.py')
DOCTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tools', 'doctor.py')


def launched(args, argv):
    """The launcher (aprun on a Cray, srun, mpirun ...), the interpreter (shell words: 'python3 -u' or
    'apptainer exec img.sif python' work), then the command."""
    return [*shlex.split(args.launcher), *shlex.split(args.python), *argv]


# Flags of saveFeatures_1024.py that the generator itself sets in every job, and what to do instead.
OWNED = {'shard': 'every job gets its own --shard (0 .. num-shards-1) from the generator; leave it out',
         'num_shards': 'give --num-shards to generate_pbs.py itself (before --): it makes that many jobs',
         'device': 'give --device to generate_pbs.py itself (before --)'}


def walltime(text):
    """--walltime as PBS and Slurm both take it: HH:MM:SS (hours may exceed 24), or D-HH:MM:SS for Slurm."""
    if not re.fullmatch(r'(\d+-)?\d+:[0-5]\d:[0-5]\d', text.strip()):
        raise argparse.ArgumentTypeError(f'{text!r} is not a walltime of the form HH:MM:SS (e.g. 02:30:00)')
    return text.strip()


def extraction_argv(args, shard):
    """The command of one shard: saveFeatures_1024.py, the shard, and the pass-through arguments."""
    return launched(args, [SCRIPT, '--shard', str(shard), '--num-shards', str(args.num_shards), '--device',
                           args.device, *args.extra])


def doctor_argv(args):
    """doctor.py for the jobs' --device: '0' or '@cupy:0' must find that GPU usable; '-1' or '@numpy' the CPU."""
    spec = args.device
    gpu = spec.startswith('@cupy') or (spec.lstrip('-').isdigit() and int(spec) >= 0)
    device = spec.rsplit(':', 1)[-1] if spec.startswith('@cupy') else spec if gpu else '0'
    return launched(args, [DOCTOR, '--quick', '--device', device] + (['--require-gpu'] if gpu else []))


def shell_line(argv):
    """argv as one shell line, where the shard '$SHARD' stays the job script's variable."""
    return ' '.join('"$SHARD"' if a == '$SHARD' else shlex.quote(a) for a in argv)


def job_body(args, shard_expression):
    """The part every scheduler's script shares: go to the submit folder, set up, run one shard."""
    lines = ['set -euo pipefail',
             '# Torque/PBS sets PBS_O_WORKDIR; under Slurm (also via its qsub wrapper) it is empty.',
             'cd "${PBS_O_WORKDIR:-${SLURM_SUBMIT_DIR:-%s}}"' % shlex.quote(os.path.abspath(args.workdir)),
             f'SHARD={shard_expression}']
    lines += [f'module load {value}' if kind == 'module' else value for kind, value in args.prelude]
    lines.append('echo "shard $SHARD of %d on $(hostname), $(date)"' % args.num_shards)
    if args.doctor:  # a node that cannot run the shard stops here, in a minute, with the reason in the log
        lines.append(shell_line(doctor_argv(args)))
    lines.append(shell_line(extraction_argv(args, '$SHARD')))
    return '\n'.join(lines) + '\n'


def pbs_script(args, shard):
    resources = [f'#PBS -N {args.name}_{shard:02d}', f'#PBS -l nodes={args.nodes}',
                 f'#PBS -l walltime={args.walltime}', '#PBS -j oe',
                 f'#PBS -o {os.path.join(args.log_dir, f"{args.name}_{shard:02d}.log")}']
    if args.queue:
        resources.append(f'#PBS -q {args.queue}')
    resources += [f'#PBS {r}' for r in args.pbs_option]
    return '#!/bin/bash\n' + '\n'.join(resources) + '\n' + job_body(
        args, '${PBS_ARRAYID:-${SLURM_ARRAY_TASK_ID:-%d}}' % shard)


def slurm_script(args):
    """One job array covering every shard."""
    resources = [f'#SBATCH --job-name={args.name}', f'#SBATCH --array=0-{args.num_shards - 1}',
                 f'#SBATCH --time={args.walltime}', '#SBATCH --nodes=1', '#SBATCH --ntasks=1',
                 f'#SBATCH --cpus-per-task={args.cpus}',
                 f'#SBATCH --output={os.path.join(args.log_dir, args.name + "_%a.log")}']
    if args.gpus:
        resources.append(f'#SBATCH --gres=gpu:{args.gpus}')
    if args.partition:
        resources.append(f'#SBATCH --partition={args.partition}')
    resources += [f'#SBATCH {r}' for r in args.slurm_option]
    return '#!/bin/bash\n' + '\n'.join(resources) + '\n' + job_body(args, '${SLURM_ARRAY_TASK_ID:?not a job array}')


def write_script(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)
        os.chmod(tmp, 0o755)


def submit(command, dry_run):
    print('$ ' + ' '.join(shlex.quote(c) for c in command), flush=True)
    if dry_run:
        return ''
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'error: {command[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}')
    print(result.stdout.strip(), flush=True)
    return result.stdout.strip()


def run_local(args):
    """Run the shards on this machine, `--parallel` at a time, each logging to its own file. Each shard runs in its
    own process group, so that a Ctrl-C reaches it once, from here: it stops with its files whole, and so does
    this script (one line, exit status 130)."""
    os.makedirs(args.log_dir, exist_ok=True)
    waiting = list(range(args.num_shards))
    running, failed, start = {}, [], time.time()
    try:
        while waiting or running:
            while waiting and len(running) < args.parallel:
                shard = waiting.pop(0)
                log = open(os.path.join(args.log_dir, f'{args.name}_{shard:02d}.log'), 'w')
                running[shard] = (subprocess.Popen(extraction_argv(args, shard), stdout=log,
                                                   stderr=subprocess.STDOUT, process_group=0), log)
            time.sleep(0.2)
            for shard, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[shard]
                    with open(log.name) as f:
                        last = (f.read().strip().splitlines() or ['(no output)'])[-1]
                    last = last.split(': ', 1)[-1] if last.startswith(f'shard {shard} done:') else last
                    print(f'[{time.time() - start:6.0f}s] shard {shard} of {args.num_shards} '
                          f'{"finished" if proc.returncode == 0 else f"FAILED ({proc.returncode})"}: {last}',
                          flush=True)
                    if proc.returncode:
                        failed.append(shard)
    finally:
        stop_shards(running.values())
    if failed:
        sys.exit(f'error: shards {failed} failed; see their logs in {args.log_dir}/ and rerun (done clips are kept)')


def stop_shards(running, patience=60):
    """Ctrl-C to every shard still running (each ends with its files whole and a line in its log), then wait for
    them; one that has not ended after `patience` seconds is killed (its finished clips are kept all the same)."""
    for proc, _ in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc, log in running:
        try:
            proc.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class InOrder(argparse.Action):
    """--module and --setup lines, kept in the order given (a site's init script may have to come first)."""

    def __call__(self, parser, namespace, value, option=None):
        namespace.prelude = [*(getattr(namespace, 'prelude', None) or []), (self.dest, value)]


def parse_args(argv=None):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--scheduler', default='pbs', choices=('pbs', 'slurm', 'local'))
    p.add_argument('--num-shards', type=positive_int, default=12)
    p.add_argument('--walltime', default='02:30:00', type=walltime,
                   help='per job, [D-]HH:MM:SS (PBS and Slurm both read it)')
    p.add_argument('--name', default=StreamPath('saveFeatures'),
                   help='job name and log file prefix (with -- --stream flow: saveFeatures_flow)')
    p.add_argument('--script-dir', default='jobs', help='where the job scripts are written')
    p.add_argument('--log-dir', default='jobs', help='where the jobs write their output')
    p.add_argument('--workdir', default='.', help='folder the jobs run in when the scheduler does not say')
    p.add_argument('--python', default=sys.executable,
                   help='interpreter the jobs use, as shell words (default: this one)')
    p.add_argument('--launcher', default='',
                   help="prefix of every command in a job: 'aprun -n 1 -N 1' on a Cray (Blue Waters: without it "
                        "the job runs on a service node with no GPU), 'srun -n 1', 'mpirun -n 1' ...")
    p.add_argument('--device', default=None,
                   help='--device of saveFeatures_1024.py (default: 0, the GPU; -1, the CPU, in local mode)')
    p.add_argument('--module', action=InOrder, default=None,
                   help='`module load` this (repeatable; with --setup, in the order given)')
    p.add_argument('--setup', action=InOrder, default=None,
                   help='a shell line run before the shard (repeatable; e.g. `source /opt/modules/default/init/bash`)')
    p.add_argument('--nodes', default='1:ppn=4:gpus=1',
                   help="PBS '-l nodes=' (Torque's GPU node syntax; Blue Waters: 1:ppn=16:xk)")
    p.add_argument('--queue', default='', help='PBS queue (-q)')
    p.add_argument('--pbs-option', action='append', default=[], help='another #PBS line (repeatable)')
    p.add_argument('--partition', default='', help='Slurm partition')
    p.add_argument('--gpus', type=nonnegative_int, default=1, help='GPUs per Slurm job (0: none)')
    p.add_argument('--cpus', type=positive_int, default=4, help='CPUs per Slurm job')
    p.add_argument('--slurm-option', action='append', default=[], help='another #SBATCH line (repeatable)')
    p.add_argument('--parallel', type=positive_int, default=1, help='local mode: shards run at once')
    p.add_argument('--doctor', action='store_true',
                   help='start every job with doctor.py (--require-gpu for a GPU device): a node whose GPU stack is '
                        'broken fails in a minute, with the reason in the job log')
    p.add_argument('--dry-run', action='store_true', help='print the scripts and submit commands, submit nothing')
    args = p.parse_args(argv)
    args.extra, args.prelude = extra, getattr(args, 'prelude', None) or []
    if args.device is None:  # batch jobs go to GPU nodes; here, the scripts' own default
        args.device = DEFAULT_DEVICE if args.scheduler == 'local' else '0'
    # What the jobs will be told, checked now with saveFeatures_1024.py's own parser (exit 2 on a bad value),
    # not by 12 jobs failing in the queue.
    import saveFeatures_1024
    args.shard_args = saveFeatures_1024.parse_args(['--shard', '0', '--num-shards', str(args.num_shards),
                                                    '--device', args.device, *extra])
    if isinstance(args.name, StreamPath):  # the jobs of the two streams' extractions keep apart
        args.name = stream_path(args.name, args.shard_args.stream)
    # The flags the generator sets for every job must not come after -- as well (the last one would win: every
    # job would extract the same shard). Parsed as saveFeatures_1024.py would, abbreviations and -d included.
    probe = saveFeatures_1024.make_parser()
    probe.set_defaults(**{flag: None for flag in OWNED})
    given = probe.parse_args(extra)
    for flag, advice in OWNED.items():
        if getattr(given, flag) is not None:
            p.error(f'--{flag.replace("_", "-")} after --: {advice}')
    return args


def preflight(args):
    """Before any script is written or submitted: the scheduler's command, the data, the lists, the model."""
    from helperFunctions import check_clips_on_disk, read_split
    from ucf.errors import DataError
    from ucf.files import check_outputs
    check_outputs(folders={'--log-dir': args.log_dir,
                           **({'--script-dir': args.script_dir} if args.scheduler != 'local' else {})})
    command = {'pbs': 'qsub', 'slurm': 'sbatch'}.get(args.scheduler)
    if command and not shutil.which(command):
        raise DataError(f'{command} not found on PATH: run this on the cluster\'s login node, or choose '
                        '--scheduler slurm/pbs/local (--dry-run writes nothing and only prints the scripts)')
    shard = args.shard_args
    clips = [c for s in shard.subsets for c in read_split(shard.lists, shard.split, s)]
    check_clips_on_disk(shard.data, clips, shard.skip_missing)
    if not os.path.isfile(shard.model):
        raise DataError(f'{shard.model}: fine-tuned model not found (the jobs run in {os.getcwd()}); make it with '
                        '`python frameBasedTrain.py` (Part 1), or pass -- --model PATH')


def main(argv=None):
    args = parse_args(argv)
    if not args.dry_run:
        with exit_on_user_error():
            preflight(args)
    if args.scheduler == 'local':
        if args.doctor and not args.dry_run and subprocess.run(doctor_argv(args)).returncode:
            sys.exit('error: doctor.py found this machine not ready (see above); no shard was started')
        if args.dry_run:
            for shard in range(args.num_shards):
                print('$ ' + shell_line(extraction_argv(args, shard)))
            return []
        with exit_on_user_error():
            run_local(args)
        return []
    if not args.dry_run:
        with exit_on_user_error():  # a disk that fills up now, say
            os.makedirs(args.script_dir, exist_ok=True)
            os.makedirs(args.log_dir, exist_ok=True)
    if args.scheduler == 'pbs':
        scripts = [(os.path.join(args.script_dir, f'{args.name}_{k:02d}.pbs'), pbs_script(args, k))
                   for k in range(args.num_shards)]
        command = ['qsub']
    else:
        scripts = [(os.path.join(args.script_dir, f'{args.name}.sbatch'), slurm_script(args))]
        command = ['sbatch']
    job_ids = []
    for path, text in scripts:
        if args.dry_run:
            print(f'# ---- {path}\n{text}', end='')
        else:
            with exit_on_user_error():
                write_script(path, text)
        job_ids.append(submit(command + [path], args.dry_run))
    return job_ids


if __name__ == '__main__':
    main()
