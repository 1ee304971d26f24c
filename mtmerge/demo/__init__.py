"""``mtmerge demo``: a small, real multi-task merging experiment on a bundled dataset.

Nothing is downloaded: the data is scikit-learn's bundled ``load_digits`` (1797 greyscale
8x8 images of the digits 0-9). The experiment follows the task-arithmetic and TIES papers
in miniature: one pre-trained backbone, one full fine-tune per task with that task's
classification head frozen, the fine-tunes merged into one backbone, and every model
evaluated on every task with each task's own (frozen) head.

A second experiment (``moe_experiment``) trains one multi-task model on the same tasks, their
tokens mixed in every batch, three ways: a dense SwiGLU block, a shared
:class:`mtmerge.nn.MoEFeedForward` and a :class:`mtmerge.nn.TaskMoE` with one router per task
(M³ViT's task-conditioned sparse pathway), trained with mtmerge's MoE ops forward and backward,
and prints each task's accuracy and the FLOPs per token each model spends.

Modules: ``data`` (the digits, the tasks, the settings), ``models`` (the MLP and its
training), ``checkpoints`` (saving, caching, reading back through the pipeline's reader),
``experiment`` (the merge methods and the run), ``moe_experiment`` (the multi-task MoE
models, their training and FLOPs), ``report`` (tables and summaries) and ``command`` (the
``mtmerge demo`` options; ``--experiments merge moe`` chooses what runs, both by default).

Design choices
--------------
Data split
    One fixed permutation (``seed``) of the 1797 images: 500 for pre-training (labels
    unused), 700 to build the heads and fine-tune, 250 validation (only to choose each merge
    method's lambda) and the remaining 347 for test (every number in the table).
Tasks
    Six tasks, each a different "view" of the same images, so that the tasks want
    different things from the shared backbone (the papers' eight vision datasets, in
    miniature): ``digits`` (0-9, upright), ``rot90`` (0-9, rotated 90 degrees), ``mirror``
    (0-9, flipped left-right), ``negative`` (0-9, intensities inverted), ``parity``
    (even/odd, upside down) and ``mod3`` (digit mod 3, transposed). ``--quick`` uses four of
    them (``digits``, ``rot90``, ``negative``, ``parity``).
Backbone and pre-training
    An MLP 64 -> 512 -> 512 -> 256 (GELU after every layer; 427k parameters, all merged)
    pre-trained as a denoising autoencoder (Gaussian noise 0.2, a linear decoder that is
    then discarded) on the unlabelled pre-training images in every task's view: a generic,
    self-supervised "foundation" backbone that has seen all the input distributions but no
    labels.
Heads
    Frozen and shared by the base, the fine-tune and every merge, as the papers' zero-shot
    CLIP heads are: a nearest-class-mean ("prototype") head per task built from the base
    backbone's features of 5 training images per class (``W_c = 5 * normalize(mu_c - mu)``,
    ``b_c = -W_c . mu``). The base model's accuracy is this few-shot head on the
    pre-trained features. Every checkpoint (base, fine-tunes) stores the backbone and all
    six heads; the heads are identical in all of them, so their task vectors are zero and
    every merge method leaves them exactly as they are: a merged ``model.safetensors`` is a
    complete multi-task model.
Fine-tuning
    The whole backbone, head frozen, cross-entropy, SGD with momentum 0.9, lr 0.01, batch
    32, 10 epochs (220 steps). SGD, not the papers' AdamW, is a deliberate deviation that
    favours trimming: in a prototype trial (one seed, Adam lr 1e-4) Adam's sign-like updates
    gave task vectors whose top-20% magnitudes carry less of the vector, and TIES came out
    level with plain averaging (80.3% vs 80.4% mean) while task arithmetic reached 83.2%.
Checkpoints and caching
    Hugging Face-style directories (``model.safetensors`` + ``config.json``) under
    ``<work-dir>/<full|quick>/``: ``base/``, ``finetuned/<task>/``, and the merges in
    ``merged/<method>/`` (with the exact merge config beside them in ``configs/``). The
    pre-trained and fine-tuned checkpoints are reused when every ``config.json`` carries the
    hash of the current training settings and every tensor has the expected name and shape;
    otherwise (or with ``--retrain``) all of them are retrained. Default work dir:
    ``$MTMERGE_DEMO_DIR``, else ``$XDG_CACHE_HOME/mtmerge/demo``, else ``~/.cache/mtmerge/demo``.
Merging
    Every merge is one ``mtmerge.merge_checkpoints(config, out_dir)`` call on the saved
    checkpoints with a mergekit-style config (``configs/<method>.yaml``), i.e. the same
    pipeline a user runs on a real model (``examples/demo_ties.yaml`` is the TIES one), with
    the pipeline's defaults unless stated: TIES knobs ``flavor: mergekit``, per-tensor trim
    (``scope: tensor``), ``normalize`` true for the TIES methods (mean of the agreeing
    entries). The merged checkpoint is then loaded and evaluated. Methods:

    * ``average``: task arithmetic with weights 1/T and lambda 1 (plain weight averaging of
      the fine-tunes); nothing tuned.
    * ``task_arithmetic``, ``ties`` (density 0.2, the TIES paper's k = 20%), ``dare_ties``
      (density 0.2, seed 0, the DARE paper's ``1/density`` rescale and TIES' mean rather
      than mergekit's L1 rescale and sum), ``consensus_ties`` (density 0.2) and
      ``consensus_task_arithmetic`` (TALL masks with the pipeline's defaults, consensus of
      k = 2 tasks): weights 1, lambda chosen on the validation split from the grid
      ``LAMBDA_GRID`` (0.1 to 2.0), as the papers tune it on held-out data.

    The lambda search costs one merge per method: the output of every method is
    ``base + lambda * merged`` with ``merged`` independent of lambda, so the merge is run
    once at lambda 1 and the validation accuracy is read along that line (ties go to the
    smaller lambda); the chosen lambda
    is then merged for real by the pipeline and that checkpoint is what the table reports.
    "merge s" is the wall-clock time of that final ``merge_checkpoints`` call (reading the
    checkpoints, merging, writing the output).
Table
    Test accuracy (%) of each task for the base, each individual fine-tune (on every task),
    the "individual" reference (each task by its own fine-tune) and each merge; the mean
    over tasks; the normalized accuracy (the TIES paper's: accuracy / the task's own
    fine-tune's accuracy, averaged over tasks); and the merge time. ``--json PATH`` writes
    the same numbers as JSON.
Determinism
    Fixed seeds for the split, the initialization, the noise and every shuffle (``--seed``,
    default 0; other seeds are cached in ``<full|quick>-seed<N>``), and a fixed thread count
    (``--threads``, default 1): the same table on every run with the same torch build and
    thread count (1 and 2 threads gave the same table here). The merges are bit-identical
    across thread counts (mtmerge's ops are deterministic). One thread is also the fastest
    here: the matrices are small, and on this shared 2-core machine 2 threads ran 5x slower.

Results (this machine, torch 2.13 CPU, 1 thread)
------------------------------------------------
About 20 s cold (12 s training, dominated by the 8 s pre-training), 5 s with cached
checkpoints; each merge takes 0.02-0.07 s. Seed 0 (the default table): base 77.3% mean,
individual fine-tunes 96.0%, averaging 81.3%, task arithmetic 82.3%, TIES 82.5%, DARE-TIES
82.6%, Consensus-TIES 81.3%, Consensus-TA 80.9%. Over seeds 0-9 TIES beat plain averaging
every time, by 1.2 to 5.9 points of mean accuracy (3.5 on average; seed 0 is the smallest
margin), and beat tuned task arithmetic in 8 of 10 seeds (by 0.8 points on average, -0.5 to
+2.2): the TIES paper's ordering, with small margins at this scale.

Multi-task MoE (``moe_experiment``; same split, seed and thread count)
----------------------------------------------------------------------
Architecture ``h = gelu(W_in x)`` (64 -> 64), ``h = h + block(h)``, one linear head per task,
trained from scratch on the six tasks' ``train`` images mixed in batches of 128 (Adam 3e-3, 12
epochs = 396 steps; load-balancing loss x0.01 and z-loss x0.001 for the MoE models), evaluated
one task per batch on ``test``. Blocks: dense SwiGLU of width 512; shared MoE, top-2 of 8
SwiGLU experts of width 64 (the same expert parameters as the dense block); TaskMoE, the same
experts, one router per task, 4 experts per task (``experts_per_task=4``), top-2. FLOPs per
token from the shapes (2 per multiply-add; activations, softmax and top-k not counted); a
TaskMoE token served with its task alone costs only its task's 4 router rows.
Seed 0: dense 96.1% mean accuracy at 196,608 block FLOPs per token; shared MoE 95.2% at
50,176 (3.9x fewer; 3.5x for the whole model with the input layer and head); TaskMoE 95.8% at
49,664, a task's tokens routed to 3.2 of the 8 experts on average (the shared MoE's to 7.5).
Seeds 0-2: dense 95.4-96.1%, shared MoE 95.2-96.2%, TaskMoE 94.0-95.8%. About 10 s for the
three models (reference CPU ops; 1 thread).
"""

from mtmerge.demo.checkpoints import Checkpoints, checkpoint_ok, load_checkpoint, prepare_checkpoints, save_checkpoint
from mtmerge.demo.command import EXPERIMENTS, add_arguments, default_work_dir, main, run
from mtmerge.demo.data import (
    DEMO_VERSION,
    FULL_SETTINGS,
    QUICK_SETTINGS,
    QUICK_TASKS,
    TASKS,
    Data,
    Settings,
    TaskSpec,
    load_data,
)
from mtmerge.demo.experiment import LAMBDA_GRID, METHODS, QUICK_METHODS, MethodSpec, Result, Row, run_experiment
from mtmerge.demo.models import MultiTaskMLP, build_model, evaluate
from mtmerge.demo.moe_experiment import (
    FULL_MOE_SETTINGS,
    MOE_MODELS,
    QUICK_MOE_SETTINGS,
    MoEResult,
    MoERow,
    MoESettings,
    MultiTaskNet,
    block_flops,
    model_flops,
    run_moe_experiment,
)
from mtmerge.demo.report import (
    format_moe_table,
    format_table,
    moe_summary_lines,
    print_moe_report,
    print_report,
    summary_lines,
)

_checkpoint_ok = checkpoint_ok  # the name tests/test_demo.py uses

__all__ = [
    "DEMO_VERSION",
    "EXPERIMENTS",
    "FULL_MOE_SETTINGS",
    "FULL_SETTINGS",
    "LAMBDA_GRID",
    "METHODS",
    "MOE_MODELS",
    "QUICK_METHODS",
    "QUICK_MOE_SETTINGS",
    "QUICK_SETTINGS",
    "QUICK_TASKS",
    "TASKS",
    "Checkpoints",
    "Data",
    "MethodSpec",
    "MoEResult",
    "MoERow",
    "MoESettings",
    "MultiTaskMLP",
    "MultiTaskNet",
    "Result",
    "Row",
    "Settings",
    "TaskSpec",
    "add_arguments",
    "block_flops",
    "build_model",
    "checkpoint_ok",
    "default_work_dir",
    "evaluate",
    "format_moe_table",
    "format_table",
    "load_checkpoint",
    "load_data",
    "main",
    "model_flops",
    "moe_summary_lines",
    "prepare_checkpoints",
    "print_moe_report",
    "print_report",
    "run",
    "run_experiment",
    "run_moe_experiment",
    "save_checkpoint",
    "summary_lines",
]
