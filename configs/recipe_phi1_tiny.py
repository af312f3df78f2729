"""phi-1's recipe at toy scale, with the local SmolLM2-135M-Instruct as the teacher.

    phi-jax recipe --config=configs/recipe_phi1_tiny.py --workdir=runs/recipe
    phi-jax recipe --config=configs/recipe_phi1_tiny.py --workdir=runs/recipe --teacher=http://HOST:8000/v1 \
        --config.teacher.model=NAME --config.annotate.sample=20000 --config.runner=beam

Teacher annotations on a sample of the corpus -> a quality classifier on embeddings -> score and
filter the corpus (then dedup, decontaminate) -> synthetic textbook sections + executed exercises ->
pretrain -> fine-tune on the exercises (`phi-jax finetune`) -> HumanEval pass@1 and held-out losses.
Every stage is a `phi-jax` command; `phi-jax recipe` runs them in order, skips the finished ones on
a rerun and writes WORKDIR/report.json + report.png. The sizes here are toy sizes (minutes on 2 CPU
cores); the keys are the knobs that scale it up.
"""

import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.input = "default"  # the corpus: the embedded stdlib one, or files / globs / a stage's output dir
    c.runner = "local"  # local | beam: how the record stages run (`phi-jax data ... --runner`)
    c.workers = 1
    c.beam_options = ""  # e.g. "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/t"
    t = c.teacher = ml_collections.ConfigDict()
    t.url = ""  # "" = start `phi-jax serve --model=smollm2` here; else any OpenAI-compatible endpoint
    t.model = "smollm2"  # the model name sent to the endpoint (and served locally under that name)
    t.concurrency = 8
    t.num_slots = 8  # the local server's decode batch
    t.max_len = 1536  # the local server's context
    t.timeout_s = 900.0
    a = c.annotate = ml_collections.ConfigDict()
    a.sample = 24  # corpus documents the teacher scores (phi-1: ~100k files)
    a.rubric = "code"
    a.max_chars = 1000  # of each document shown to the teacher
    a.max_tokens = 128  # of each answer
    k = c.classifier = ml_collections.ConfigDict()
    k.embedder = "smollm2"  # any model --model accepts (phi-1: a code model's embeddings)
    k.head = "forest"  # ridge | logistic | forest (phi-1: a random forest)
    k.max_tokens = 48  # tokens of each document embedded
    f = c.filter = ml_collections.ConfigDict()
    f.min_quality = 3.0  # keep documents whose predicted score is >= this
    f.documents = 300  # score only the first N corpus documents (0 = all 748)
    s = c.synthesize = ml_collections.ConfigDict()
    s.textbook = 3  # synthetic textbook sections
    s.exercises = 6  # exercises asked for (kept only if they pass their own tests in the sandbox)
    s.max_tokens = 320
    p = c.pretrain = ml_collections.ConfigDict()
    p.config = "configs/tiny.py"  # the training config; its own curation is switched off here
    p.steps = 40
    p.overrides = ""  # more `phi-jax train` overrides, space-separated (e.g. a mesh: --config.mesh.shape.fsdp=8)
    ft = c.finetune = ml_collections.ConfigDict()
    ft.config = "configs/finetune_smollm2_lora.py"  # `phi-jax finetune --config`
    ft.steps = 50
    # The base here is the pretrained Phi, so LoRA targets Phi's module names (the config's defaults
    # are Llama's); more `phi-jax finetune` overrides, space-separated.
    ft.overrides = "--config.lora.targets=q_proj,k_proj,v_proj,dense,fc1,fc2"
    e = c.eval = ml_collections.ConfigDict()
    e.humaneval_problems = 64  # the first N problems (164 = all)
    e.max_new_tokens = 128
    if arg == "runlocal":  # a test's size: a handful of everything
        a.sample, a.max_tokens, k.max_tokens, f.documents = 12, 32, 16, 40
        s.textbook, s.exercises, s.max_tokens = 2, 2, 128
        p.steps, ft.steps, e.humaneval_problems, e.max_new_tokens = 4, 2, 2, 16
        ft.config = "configs/finetune_smollm2_lora.py:runlocal"  # a batch the 8 test devices divide
    c.lock()
    return c
