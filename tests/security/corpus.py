'''Hostile and broken remote jobs, each with what must happen to it.

``ENTRIES`` is a list of dicts, one per job:

- ``name``: a short unique id; ``source``: the function's text as a client sends it;
  ``block``: the block's index; ``free``: the values sent (JSON), by name.
- ``category``:
  - ``"refused"``: ``compiler.validate.validate_block`` raises before anything runs;
    ``expect`` is ``{"line": ..., "construct": ...}`` (line in ``source``, from 1).
  - ``"runtime"``: valid Python the validator accepts; the server must stop it safely
    and the next job must give the same result as before.  ``expect`` says how:
    ``"timeout"`` (killed at the job time limit: run it with a short one),
    ``"error"`` (fails at once with the exception named in ``error``),
    ``"result-too-large"`` (over the result limit; run it with a limit below
    ``result_bytes``), ``"output-limit"`` (``output_bytes`` of print: cut at the
    output limit), ``"model-state"`` (the job leaves state on the model; the server
    fails it or cleans up, and the model is as before for the next job).
  - ``"server"``: a harmless block sent with a broken request; ``request`` holds the
    header fields to override, ``expect`` the refusal.

A refused entry marks the offending line with ``# <-`` (the line is computed from it,
unless the entry gives ``line``).  Module names are those of the default model
(``LLAMA_MODULE_NAMES``, a Llama architecture).
'''

from __future__ import annotations

import textwrap

LLAMA_MODULE_NAMES = frozenset({
    "model", "embed_tokens", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
    "mlp", "gate_proj", "up_proj", "down_proj", "act_fn", "input_layernorm",
    "post_attention_layernorm", "norm", "rotary_emb", "lm_head",
})

PROMPT = "The Eiffel Tower is in the city of"
TRACE = "model.trace(prompt, remote=True) as tracer"
HARMLESS = "logits = model.lm_head.output[:, -1].save()"


def job(body: str, header: str = TRACE, params: str = "model, prompt") -> str:
    """``@intervene def job(params): with header: body``; the body starts at line 4."""
    lines = ["@intervene", f"def job({params}):", f"    with {header}:"]
    lines += ["        " + ln if ln.strip() else "" for ln in
              textwrap.dedent(body).strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def _marked_line(source: str) -> int:
    for number, line in enumerate(source.splitlines(), 1):
        if line.rstrip().endswith("# <-"):
            return number
    raise AssertionError(f"no `# <-` mark in:\n{source}")


ENTRIES: list[dict] = []


def refused(name, body=None, construct="", *, source=None, header=TRACE, params="model, prompt",
            block=0, free=None, line=None, why=""):
    source = source if source is not None else job(body, header, params)
    ENTRIES.append({
        "name": name, "source": source, "block": block, "category": "refused",
        "free": {"prompt": PROMPT} if free is None else free,
        "expect": {"line": line if line is not None else _marked_line(source),
                   "construct": construct},
        "why": why,
    })


def runtime(name, body, expect, *, error=None, header=TRACE, free=None, why="", **extra):
    ENTRIES.append({
        "name": name, "source": job(body, header), "block": 0, "category": "runtime",
        "free": {"prompt": PROMPT} if free is None else free, "expect": expect,
        "error": error, "why": why, **extra,
    })


def server(name, request, expect, why=""):
    ENTRIES.append({
        "name": name, "source": job(HARMLESS), "block": 0, "category": "server",
        "free": {"prompt": PROMPT}, "request": request, "expect": expect, "why": why,
    })


# -- imports and Python's way out ----------------------------------------------------
refused("import", "import os  # <-", "import os")
refused("from_import", "from subprocess import run  # <-", "from subprocess import run")
refused("import_in_invoke", """
    with tracer.invoke(prompt):
        import os  # <-
        h = model.lm_head.output.save()
""", "import os", header="model.trace() as tracer")
refused("subclasses_walk", "x = ().__class__.__bases__[0].__subclasses__()  # <-", "__class__",
        why="the classic sandbox escape: from any object to every class")
refused("object_subclasses", "x = object.__subclasses__()  # <-", "object")
refused("builtins_name", "b = __builtins__  # <-", "__builtins__")
refused("assign_builtins", "__builtins__ = {}  # <-", "__builtins__")
refused("dunder_import", "os = __import__('os')  # <-", "__import__")
refused("os_system", "os.system('id')  # <-", "os", why="os is neither sent nor provided")
refused("missing_free", "x = secret * 2  # <-", "secret")
refused("eval", "x = eval('1 + 1')  # <-", "eval")
refused("exec", "exec('import os')  # <-", "exec")
refused("compile", "c = compile('1', 'x', 'eval')  # <-", "compile")
refused("open_passwd", "text = open('/etc/passwd').read()  # <-", "open")
refused("getattr_concat", "f = getattr(torch, 'lo' + 'ad')  # <-", "getattr")
refused("setattr_model", "setattr(model, 'training', True)  # <-", "setattr")
refused("delattr_model", "delattr(model, 'lm_head')  # <-", "delattr")
refused("hasattr_probe", "ok = hasattr(prompt, '__class__')  # <-", "hasattr")
refused("globals", "g = globals()  # <-", "globals")
refused("vars", "v = vars(model)  # <-", "vars")
refused("type", "t = type(prompt)  # <-", "type")
refused("breakpoint", "breakpoint()  # <-", "breakpoint")
refused("input", "x = input()  # <-", "input")
refused("memoryview", "m = memoryview(prompt)  # <-", "memoryview")
refused("super", "s = super()  # <-", "super")
refused("str_format", "s = '{0.__class__}'.format(prompt)  # <-", "format",
        why="str.format fields walk attributes at run time")
refused("str_format_unbound", "f = str.format  # <-", "format")
refused("fstring_dunder", "s = f'{prompt.__class__.__init__.__globals__}'  # <-", "__class__")
refused("exception_traceback", """
    try:
        x = 1 / 0
    except ZeroDivisionError as e:
        frame = e.__traceback__.tb_frame  # <-
""", "__traceback__")
refused("catch_base_exception", """
    try:
        pass
    except BaseException:  # <-
        pass
""", "BaseException", why="would swallow the server's own stop signals")
refused("bare_except", """
    try:
        x = 1
    except:  # <-
        pass
""", "except:")
refused("rebind_torch", "torch = prompt  # <-", "torch")
refused("fullwidth_torch", "ｔｏｒｃｈ.save(prompt, '/tmp/x')  # <-", "ｔｏｒｃｈ",
        why="Python reads identifiers NFKC-normalized: this is `torch.save`")
refused("fullwidth_save", """
    h = model.lm_head.output
    h.ｓａｖｅ()  # <-
""", "ｓａｖｅ")
refused("control_character", None, "source", line=4,
        source=job("x = 1  # a comment? CTRLimport os").replace("CTRL", "\x0b"),
        why="no character on which two parsers could split lines differently")
refused("tracer_private", "inter = tracer._inter  # <-", "_inter")

# -- syntax that defines or reaches code --------------------------------------------
refused("lambda", "f = lambda x: x  # <-", "lambda")
refused("def", """
    def helper():  # <-
        pass
""", "def helper")
refused("class", """
    class Evil:  # <-
        pass
""", "class Evil")
refused("global", "global counter  # <-", "global counter")
refused("match_class_keyword", """
    match prompt:
        case str(__class__=c):  # <-
            pass
""", "str(__class__=c)", why="keyword class patterns read attributes by name")
refused("match_object_pattern", """
    match prompt:
        case object():  # <-
            pass
""", "object")
refused("yield", "yield 1  # <-", "yield")

# -- torch outside the allowlist ------------------------------------------------------
refused("torch_load", "w = torch.load('/tmp/w.pt')  # <-", "torch.load",
        why="unpickling runs code")
refused("torch_save", "torch.save(model.lm_head.output, '/tmp/out.pt')  # <-", "torch.save")
refused("torch_hub", "m = torch.hub.load('owner/repo', 'model')  # <-", "torch.hub")
refused("torch_ops", "x = torch.ops.aten.zeros([1])  # <-", "torch.ops")
refused("torch_compile", "f = torch.compile(torch.softmax)  # <-", "torch.compile")
refused("torch_jit", "m = torch.jit.load('/tmp/m.pt')  # <-", "torch.jit")
refused("torch_classes", "torch.classes.load_library('/tmp/x.so')  # <-", "torch.classes")
refused("torch_cpp_extension", "torch.utils.cpp_extension.load_inline('x', '')  # <-",
        "torch.utils")
refused("torch_library", "lib = torch.library.Library('aten', 'IMPL')  # <-", "torch.library")
refused("torch_cuda", "s = torch.cuda.memory_snapshot()  # <-", "torch.cuda")
refused("torch_distributed", "torch.distributed.init_process_group('gloo')  # <-",
        "torch.distributed")
refused("torch_backends", "torch.backends.cudnn.enabled = False  # <-", "torch.backends")
refused("torch_global_grad_mode", "torch.set_grad_enabled(False)  # <-",
        "torch.set_grad_enabled", why="global state: would change the next job")
refused("torch_manual_seed", "torch.manual_seed(0)  # <-", "torch.manual_seed",
        why="global RNG state: use torch.Generator().manual_seed(n) and generator=")
refused("torch_empty", "x = torch.empty(1000).save()  # <-", "torch.empty",
        why="uninitialized memory may hold an earlier job's values")
refused("torch_tensor_ctor", "x = torch.Tensor(1000)  # <-", "torch.Tensor(1000)")
refused("tensor_new_empty", "x = model.lm_head.output.new_empty(1000)  # <-", "new_empty")

# -- the served model: weights, buffers, settings, hooks --------------------------------
refused("weight_data_zero", "model.model.layers[0].mlp.down_proj.weight.data.zero_()  # <-",
        "weight")
refused("weight_slice_assign", "model.model.layers[0].mlp.down_proj.weight[:] = 0  # <-",
        "weight")
refused("weight_copy_no_grad", """
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.zeros(1))  # <-
""", "weight")
refused("weight_assign", "model.lm_head.weight = None  # <-", "weight")
refused("parameters_loop", """
    for p in model.parameters():  # <-
        p.data.mul_(0)
""", "parameters")
refused("state_dict", "sd = model.state_dict()  # <-", "state_dict")
refused("named_parameters", "ps = dict(model.named_parameters())  # <-", "named_parameters")
refused("buffer_inv_freq", "model.model.rotary_emb.inv_freq.zero_()  # <-", "inv_freq")
refused("module_to_half", "model.model.layers[0].to(torch.float16)  # <-", "to",
        why="Module.to converts the parameters in place")
refused("model_train", "model.train()  # <-", "train")
refused("training_flag", "model.training = True  # <-", "training")
refused("requires_grad_module", "model.requires_grad_(True)  # <-", "requires_grad_")
refused("forward_hook", "model.lm_head.register_forward_hook(print)  # <-",
        "register_forward_hook")
refused("config", "c = model.config  # <-", "config")
refused("tokenizer_save", "model.tokenizer.save_pretrained('/tmp/x')  # <-", "tokenizer")
refused("del_module", "del model.lm_head  # <-", "del model.lm_head")
refused("replace_module", "model.model.layers[0] = model.model.layers[1]  # <-",
        "model.model.layers[1]")
refused("set_child_module", "model.model.layers[0].mlp = None  # <-", "mlp")
refused("envoy_into_list", """
    mods = []
    mods.append(model.lm_head)  # <-
""", "model.lm_head", why="a module hidden in a list would pass for a tensor")
refused("envoy_as_loop_item_target", """
    xs = [0]
    for xs[0] in model.model.layers:  # <-
        pass
    xs[0].to(torch.float16)
""", "xs[0]", why="a loop target that is an item would hide the module in a list")
refused("envoy_as_comprehension_item_target", """
    d = {}
    n = [0 for d['m'] in model.model.layers]  # <-
""", "d['m']")
refused("envoy_into_dict", "d = {'m': model.lm_head}  # <-", "model.lm_head")
refused("envoy_alias_to", """
    m = model.lm_head
    m.to(torch.float16)  # <-
""", "to")
refused("loop_module_half", """
    for layer in model.model.layers:
        layer.half()  # <-
""", "half")

# -- tensors: hooks, autograd graph, raw memory -------------------------------------------
refused("tensor_hook", """
    h = model.lm_head.output
    h.register_hook(print)  # <-
""", "register_hook")
refused("grad_fn_walk",
        "p = model.lm_head.output.grad_fn.next_functions[0][0].variable  # <-", "grad_fn",
        why="the autograd graph leads back to the parameters")
refused("untyped_storage", "s = model.lm_head.output.untyped_storage()  # <-",
        "untyped_storage")
refused("data_ptr", "a = model.lm_head.output.data_ptr()  # <-", "data_ptr")
refused("set_", """
    h = model.lm_head.output
    h.set_(torch.zeros(1))  # <-
""", "set_")
refused("numpy_tofile", "model.lm_head.output.numpy().tofile('/tmp/x')  # <-", "numpy")
refused("apply_", "model.lm_head.output.apply_(print)  # <-", "apply_")
refused("tensor_data_assign", "model.lm_head.output.data = torch.zeros(1)  # <-", "data")
refused("save_alias", """
    h = model.lm_head.output
    f = h.save  # <-
""", "save", why="only `x.save()` itself is the compiler's marker; an alias is a method")
refused("save_module", "m = model.lm_head.save()  # <-", "save")
refused("save_to_path", "h = model.lm_head.output.save('/tmp/h.pt')  # <-",
        "model.lm_head.output.save('/tmp/h.pt')")

# -- the block's header --------------------------------------------------------------------
refused("generate_custom_code", "out = model.generator.output.save()", "custom_generate",
        header="model.generate(prompt, max_new_tokens=2, custom_generate='evil/repo', "
               "trust_remote_code=True) as tracer", line=3,
        why="custom_generate loads and runs code")
refused("generate_hub_mode", "out = model.generator.output.save()", "penalty_alpha",
        header="model.generate(prompt, max_new_tokens=2, penalty_alpha=0.6, top_k=4) "
               "as tracer", line=3, why="contrastive search is loaded from the hub")
refused("generate_kwargs", "out = model.generator.output.save()", "**options",
        header="model.generate(prompt, **options) as tracer", params="model, prompt, options",
        free={"prompt": PROMPT, "options": {"max_new_tokens": 2}}, line=3)
refused("open_in_block_header", HARMLESS, "open",
        header="model.trace(prompt, remote=True) as tracer, open('/etc/passwd') as f", line=3)
refused("model_not_a_name", None, "self.lm", source=(
    "@intervene\ndef job(self, prompt):\n    with self.lm.trace(prompt, remote=True):  # <-\n"
    "        h = self.lm.lm_head.output.save()\n"))

# -- broken sources and limits ---------------------------------------------------------------
refused("source_too_large", "s = '" + "a" * 70_000 + "'", "source", line=1)
refused("nesting_too_deep", "x = " + "[" * 150 + "]" * 150 + "  # <-", "nesting",
        why="deep trees are slow to parse and deep to walk: refused on Python's own parser")
refused("syntax_error", "x = (  # <-", "syntax")
refused("not_one_function", None, "source", source="import os\n" + job(HARMLESS), line=1)
refused("async_def", None, "async def", line=1,
        source=job(HARMLESS).replace("def job", "async def job"))
refused("block_out_of_range", HARMLESS, "block index", block=2, line=1)

refused("value_name_injection", HARMLESS, "x=__import__('os').system('id'), y", line=1,
        free={"prompt": PROMPT, "x=__import__('os').system('id'), y": 1},
        why="value names become the parameters of the function the server compiles")
refused("value_name_keyword", HARMLESS, "lambda", line=1, free={"prompt": PROMPT, "lambda": 1})

# -- accepted, stopped at run time ----------------------------------------------------------
runtime("infinite_loop", """
    while True:
        pass
""", "timeout")
runtime("swallow_timeout", """
    while True:
        try:
            x = 1
        except Exception:
            pass
""", "timeout", why="a timeout raised as an exception would be caught: the worker is killed")
runtime("long_range", """
    for i in range(10**12):
        pass
""", "timeout")
runtime("huge_int", "x = 10**10**8", "timeout")
runtime("huge_allocation", "x = torch.zeros(10**12)", "error", error="RuntimeError")
runtime("string_bomb", "s = 'a' * 10**15", "error", error="MemoryError")
runtime("print_flood", """
    for i in range(50_000):
        print('x' * 100)
""", "output-limit", output_bytes=50_000 * 101,
        why="5 MB of print: cut at the server's output limit, the job still completes")
runtime("huge_result", "big = torch.ones(16, 1024, 1024).save()", "result-too-large",
        result_bytes=64 * 2**20)
runtime("parameter_grads", """
    loss = model.lm_head.output.sum()
    loss.backward()
""", "model-state", why="leaves .grad on the parameters when they require grad")
runtime("fstring_spec", "s = f\"{prompt:{'{0.__class__}'}}\"", "error", error="ValueError",
        why="a format spec is not a format string: no attribute walk")
runtime("raise", "raise RuntimeError('boom')", "error", error="RuntimeError")

# -- broken requests ----------------------------------------------------------------------------
server("bad_api_key", {"api_key": "not-a-key"}, "unauthorized")
server("no_api_key", {"api_key": None}, "unauthorized")
server("wrong_protocol", {"protocol": 0}, "protocol")
server("unknown_model", {"model": "no-such-model"}, "unknown-model")

assert len({e["name"] for e in ENTRIES}) == len(ENTRIES), "duplicate corpus names"
