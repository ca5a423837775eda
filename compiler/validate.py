"""The server's check of a remote block: an allowlist over the block's syntax tree.

A remote job carries the source text of one ``@intervene`` function and the index
of one ``with model.trace/generate/scan(...)`` block in it.  Before anything runs,
the server calls ``validate_block``: it parses the text with the project's own
parser (the same numbering of blocks as the plan), and walks the block's whole
tree (its header's arguments and its body) accepting only what is listed here.
Everything not listed is refused with a ``ValidationError`` naming the line and
the construct.  The check is on the source the server compiles itself, so what
is checked is exactly what runs.

What a remote block may contain
-------------------------------

Statements: assignments (also augmented, annotated, tuple targets), expression
statements, ``if``/``for``/``while`` (``else`` too), ``with``, ``try`` with named
exception classes, ``raise``, ``assert``, ``del`` of names and items, ``pass``,
``break``, ``continue``, ``match`` (class patterns: builtin classes by position only,
since keywords and ``__match_args__`` read attributes).  Refused: ``import``,
``global``, ``nonlocal``, ``def``, ``class``, ``lambda``, ``return``, ``yield``,
``await``, ``async``, a bare ``except:``, and any node type not named here.

Names resolve only to: the block's own variables (assigned in it, loop,
comprehension and ``with ... as`` targets), the free names the client sent (the
function's parameters and other variables the block reads), the block's model
(``model`` of ``model.trace``: its envoys), the block's tracer (``as tracer``),
``torch`` and ``math`` (listed functions only), ``save``, and ``SAFE_BUILTINS``.
``FORBIDDEN_NAMES`` (``eval``, ``exec``, ``getattr``, ``open``, ``type``...) are
refused whatever was sent, as is every name starting with ``__``.  The names the
server provides cannot be assigned in the block.

Attributes: no name starting with ``_``, anywhere.  Then, by what the value is:

- the model and its envoys (``model.model.layers[0].mlp``, a loop variable over
  ``model.model.layers``...): child modules only (``module_names``: the served
  model's module names), ``.output``/``.input``/``.inputs``, and
  ``model.generator``.  So parameters, buffers, ``.config``,
  ``.to()``, ``.train()``, hooks and ``state_dict()`` cannot be reached at all: a
  job writes only through ``.output``/``.input``/``.inputs``.  An envoy may be
  navigated, indexed, iterated, measured with ``len()``, called, bound to a
  variable, or given to ``tracer.cache(...)``; any other use (an argument, an
  element of a dict, an operand) is refused, so it never hides in a container
  where the checks below would take it for a tensor.
- the tracer: ``TRACER_ATTRS`` (invoke, barrier, stop, cache, all, iter, result).
- ``torch``: ``TORCH_FUNCTIONS`` (tensor math, creation with known contents,
  ``no_grad``...), ``torch.nn.functional``'s and ``torch.linalg``'s listed
  functions, dtypes and constants.  Not ``load``, ``save``, ``hub``, ``ops``,
  ``compile``, ``jit``, ``classes``, ``utils``, ``cuda``, ``distributed``,
  ``backends``, ``library``, nor ``empty``/``Tensor(n)`` (memory left by an earlier
  job) nor global state (``manual_seed``, ``set_grad_enabled``...).
- ``math``: its functions and constants.
- any other value (tensors, lists, dicts, strings, model outputs):
  ``VALUE_ATTRS``: listed tensor methods and properties, list/dict/set/str
  methods, model-output fields.  Not ``register_hook``, ``grad_fn``, ``data``,
  ``storage``, ``untyped_storage``, ``data_ptr``, ``set_``, ``resize_``,
  ``as_strided``, ``numpy``, ``apply_``, ``new_empty``, ``format`` (its fields
  read attributes: use an f-string)...  Attribute assignment only to
  ``.output``/``.input``/``.inputs`` of an envoy and ``.grad``/``.requires_grad``
  of a value.  ``x.save()`` is the compiler's marker (no arguments, on a value);
  ``.save`` any other way is refused.

A namespace (``torch``, ``torch.nn``), ``torch.Tensor`` and the tracer can only be
used through their attributes (``torch.Tensor`` also in ``isinstance``): never
bound to a variable or passed on, where the value rules would apply to them.
Which variables may hold envoys is inferred over the whole block (all bindings,
any order, one alias further per pass); a block that has not settled after
``_MAX_PASSES`` passes is refused rather than half-checked.

``module.source`` is refused: a forward's call sites hand over whatever the forward
passes (the module itself, as in ``attention_interface(self, ...)``, and
functions), which the rules for values above do not expect.

Helpers
-------

A block may call ``@intervene`` functions without a block of their own (``helpers=``:
the client ships each one's source, its defaults as values, and the values of the
module constants and closure variables its body reads).  Each helper's body is
checked with the same rules, plus ``return`` of a value (never of a module); its
name is usable only as a call (never bound, passed or read as an attribute).  A
helper's parameters are values, except those a call gives a module (``h(model)``,
``h(model.model.layers[0])``, also through helpers calling helpers): those are
modules in its check.  The kinds come from every call, iterated until nothing
changes, before any helper is checked strictly.  Its decorators, defaults and
annotations are not checked: the server never evaluates them (it builds the
function from the compiled code alone).

Header: the model is a plain name; ``generate`` takes only ``GENERATE_KEYWORDS``
and no ``**`` (``custom_generate=``/``trust_remote_code=`` would load code).
Only the block is checked: the server must run nothing else of the function
(not its signature's defaults, not its other statements); it compiles the block
alone as the body of a fresh function whose parameters are the values sent.

The text must read the same to Python and to libcst: no control characters but
tab and line ends (nor U+0085, U+2028, U+2029, where ``str.splitlines`` ends a
line), the same number of statements, and no identifier that Python would read
as another name (it normalizes them with NFKC: ``ｔｏｒｃｈ`` is ``torch``).  The
names of the values sent must be plain identifiers (the server writes them into a
``def``).

Limits: ``MAX_SOURCE_BYTES`` of source and ``MAX_DEPTH`` levels of syntax
nesting (checked on Python's own parser before libcst sees the text).  Run
time, memory, output and result size are the server's to limit: loops and big
allocations are valid Python and pass this check.
"""

from __future__ import annotations

import ast
import keyword
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import libcst as cst

from . import walk
from .analyze import block_call, block_item, statements
from .errors import CompileError
from .parse import Source, parse_error_position

__all__ = [
    "FORBIDDEN_NAMES", "GENERATE_KEYWORDS", "MATH_NAMES", "MAX_DEPTH", "MAX_SOURCE_BYTES",
    "SAFE_BUILTINS", "TENSOR_ATTRS", "TORCH_FUNCTIONS", "TRACER_ATTRS", "VALUE_ATTRS",
    "ValidationError", "module_names_of", "validate_block", "validate_session",
]

MAX_SOURCE_BYTES = 64 * 1024
MAX_DEPTH = 100  # levels of Python's syntax tree (a typical block: 20-30)

SAFE_BUILTINS = frozenset({
    "abs", "all", "any", "bool", "chr", "complex", "dict", "divmod", "enumerate", "filter",
    "float", "frozenset", "int", "isinstance", "iter", "len", "list", "map", "max", "min",
    "next", "ord", "pow", "print", "range", "repr", "reversed", "round", "set", "slice",
    "sorted", "str", "sum", "tuple", "zip",
    # exception classes, to raise and catch (BaseException and its other children: no)
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError",
    "LookupError", "NotImplementedError", "RuntimeError", "StopIteration", "TypeError",
    "ValueError", "ZeroDivisionError",
})
CONSTANT_NAMES = frozenset({"True", "False", "None"})

FORBIDDEN_NAMES = frozenset({
    "__import__", "breakpoint", "callable", "classmethod", "compile", "copyright",
    "credits", "delattr", "dir", "eval", "exec", "exit", "format", "getattr", "globals",
    "hasattr", "help", "id", "input", "issubclass", "license", "locals", "memoryview",
    "object", "open", "property", "quit", "setattr", "staticmethod", "super", "type",
    "vars", "bytearray", "bytes", "hash", "BaseException", "GeneratorExit",
    "KeyboardInterrupt", "SystemExit",
})

MATH_NAMES = frozenset({
    "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "comb",
    "copysign", "cos", "cosh", "degrees", "dist", "e", "erf", "erfc", "exp", "exp2", "expm1",
    "fabs", "factorial", "floor", "fmod", "frexp", "fsum", "gamma", "gcd", "hypot", "inf",
    "isclose", "isfinite", "isinf", "isnan", "isqrt", "lcm", "ldexp", "lgamma", "log",
    "log10", "log1p", "log2", "modf", "nan", "nextafter", "perm", "pi", "pow", "prod",
    "radians", "remainder", "sin", "sinh", "sqrt", "tan", "tanh", "tau", "trunc", "ulp",
})

_DTYPES = frozenset({
    "bfloat16", "bool", "complex64", "complex128", "double", "float", "float16", "float32",
    "float64", "half", "int", "int8", "int16", "int32", "int64", "long", "short", "uint8",
})

TORCH_FUNCTIONS = frozenset({
    # creation with known contents
    "arange", "as_tensor", "eye", "full", "full_like", "linspace", "ones", "ones_like",
    "tensor", "zeros", "zeros_like",
    # random (pass generator= for reproducible draws)
    "bernoulli", "multinomial", "normal", "rand", "rand_like", "randint", "randint_like",
    "randn", "randn_like", "randperm", "Generator",
    # shapes and indexing
    "cat", "chunk", "concat", "concatenate", "diag", "diag_embed", "diagonal", "flatten",
    "flip", "gather", "hstack", "index_select", "masked_fill", "masked_select", "meshgrid",
    "narrow", "nonzero", "permute", "repeat_interleave", "reshape", "roll", "scatter",
    "scatter_add", "select", "split", "squeeze", "stack", "t", "take", "take_along_dim",
    "tile", "transpose", "tril", "triu", "unbind", "unsqueeze", "vstack", "where",
    # math
    "abs", "absolute", "acos", "add", "addmm", "all", "allclose", "amax", "amin", "any",
    "argmax", "argmin", "argsort", "asin", "atan", "atan2", "baddbmm", "bmm", "bucketize",
    "cdist", "clamp", "clip", "clone", "corrcoef", "cos", "cosh", "cosine_similarity",
    "count_nonzero", "cov", "cross", "cummax", "cummin", "cumprod", "cumsum", "diff",
    "dist", "div", "divide", "dot", "einsum", "eq", "equal", "erf", "exp", "expm1", "floor",
    "fmod", "ge", "gt", "isclose", "isfinite", "isin", "isinf", "isnan", "kthvalue", "le",
    "lerp", "log", "log10", "log1p", "log2", "log_softmax", "logical_and", "logical_not",
    "logical_or", "logical_xor", "logsumexp", "lt", "matmul", "max", "maximum", "mean",
    "median", "min", "minimum", "mm", "mul", "multiply", "mv", "nan_to_num", "nanmean",
    "nansum", "ne", "neg", "norm", "numel", "outer", "pow", "prod", "quantile",
    "reciprocal", "relu", "remainder", "round", "rsqrt", "searchsorted", "sigmoid", "sign",
    "sin", "sinh", "softmax", "sort", "sqrt", "square", "std", "std_mean", "sub",
    "subtract", "sum", "tan", "tanh", "tensordot", "topk", "trace", "trunc", "unique",
    "var", "var_mean",
    "bincount", "block_diag", "broadcast_to", "histc", "kron", "logit", "movedim", "moveaxis",
    "rot90", "swapaxes",
    # grad modes (context managers: the mode is restored after), tests, types
    "enable_grad", "inference_mode", "no_grad",
    "finfo", "iinfo", "is_floating_point", "is_tensor", "device", "Size",
    # constants
    "e", "inf", "nan", "pi",
}) | _DTYPES

# Namespaces under torch and their listed members.
_TORCH_SUBMODULES = {
    "torch.nn": frozenset({"functional"}),
    "torch.nn.functional": frozenset({
        "cosine_similarity", "cross_entropy", "dropout", "embedding", "gelu", "kl_div",
        "l1_loss", "layer_norm", "linear", "log_softmax", "mse_loss", "nll_loss", "normalize",
        "one_hot", "pad", "relu", "rms_norm", "scaled_dot_product_attention", "sigmoid",
        "silu", "softmax", "softplus", "tanh",
    }),
    "torch.linalg": frozenset({
        "det", "eigh", "eigvalsh", "inv", "lstsq", "matrix_norm", "matrix_rank", "norm", "pinv",
        "qr", "solve", "svd", "svdvals", "vector_norm",
    }),
}
# A class: usable in isinstance(), not callable (torch.Tensor(n) is uninitialized memory).
_TORCH_CLASSES = frozenset({"Tensor"})

TENSOR_ATTRS = frozenset({
    # properties
    "H", "T", "dtype", "device", "grad", "imag", "is_cuda", "is_leaf", "layout", "mH", "mT",
    "ndim", "real", "requires_grad", "shape",
    # methods
    "abs", "absolute", "acos", "add", "addmm", "all", "allclose", "amax", "amin", "angle",
    "any", "argmax", "argmin", "argsort", "asin", "atan", "atan2", "backward", "baddbmm",
    "bfloat16", "bmm", "bool", "byte", "ceil", "char", "chunk", "clamp", "clamp_max",
    "clamp_min", "clip", "clone", "contiguous", "cos", "cosh", "count_nonzero", "cpu",
    "cuda", "cummax", "cummin", "cumprod", "cumsum", "detach", "diag", "diagonal", "diff",
    "dim", "div", "divide", "dot", "double", "element_size", "eq", "equal", "erf", "exp",
    "expand", "expand_as", "expm1", "flatten", "flip", "float", "floor", "floor_divide",
    "fmod", "frac", "gather", "ge", "gt", "half", "index_add", "index_copy", "index_fill",
    "index_put", "index_select", "int", "is_contiguous", "is_floating_point", "isclose",
    "isfinite", "isinf", "isnan", "item", "kthvalue", "le", "lerp", "log", "log10",
    "log1p", "log2", "log_softmax", "logical_and", "logical_not", "logical_or",
    "logical_xor", "logsumexp", "long", "lt", "masked_fill", "masked_scatter",
    "masked_select", "matmul", "max", "maximum", "mean", "median", "min", "minimum", "mm",
    "mul", "multiply", "mv", "nan_to_num", "nanmean", "nansum", "narrow", "ne", "neg",
    "negative", "nelement", "new_full", "new_ones", "new_tensor", "new_zeros", "nonzero",
    "norm", "numel", "outer", "permute", "pow", "prod", "reciprocal", "relu", "remainder",
    "repeat", "repeat_interleave", "requires_grad_", "reshape", "reshape_as", "retain_grad",
    "roll", "round", "rsqrt", "scatter", "scatter_add", "select", "short", "sigmoid",
    "sign", "sin", "sinh", "size", "softmax", "sort", "split", "sqrt", "square", "squeeze",
    "std", "sub", "subtract", "sum", "t", "tan", "tanh", "to", "tolist", "topk",
    "transpose", "tril", "triu", "true_divide", "trunc", "type_as", "unbind", "unflatten",
    "unique", "unsqueeze", "var", "view", "view_as", "where",
    "bincount", "histc", "logit", "mode", "movedim", "moveaxis", "nbytes", "itemsize", "ravel",
    "swapaxes", "swapdims", "take", "take_along_dim", "trace", "type", "unfold", "broadcast_to",
    # in place (on the job's own values: activations, its tensors)
    "abs_", "add_", "clamp_", "clamp_max_", "clamp_min_", "copy_", "div_", "exp_", "fill_",
    "fill_diagonal_", "index_add_", "index_copy_", "index_fill_", "index_put_", "lerp_",
    "log_", "masked_fill_", "masked_scatter_", "mul_", "nan_to_num_", "neg_", "normal_",
    "pow_", "reciprocal_", "relu_", "round_", "scatter_", "scatter_add_", "sigmoid_",
    "sign_", "sqrt_", "square_", "sub_", "tanh_", "tril_", "triu_", "uniform_", "zero_",
    "detach_", "squeeze_", "unsqueeze_", "clip_", "floor_", "ceil_", "trunc_", "fmod_",
    "remainder_",
})

VALUE_ATTRS = TENSOR_ATTRS | frozenset({
    # list
    "append", "clear", "copy", "count", "extend", "index", "insert", "pop", "remove",
    "reverse", "sort",
    # dict
    "get", "items", "keys", "popitem", "setdefault", "update", "values",
    # set
    "add", "difference", "discard", "intersection", "issubset", "issuperset",
    "symmetric_difference", "union",
    # str
    "capitalize", "casefold", "center", "endswith", "find", "isalpha", "isdigit", "join",
    "ljust", "lower", "lstrip", "replace", "rfind", "rjust", "rsplit", "rstrip", "split",
    "splitlines", "startswith", "strip", "title", "upper", "zfill",
    # model outputs, named tuples (topk, max, svd), finfo, generators
    "attentions", "hidden_states", "indices", "last_hidden_state", "logits", "loss",
    "past_key_values", "to_tuple", "eps", "tiny", "bits", "resolution", "manual_seed",
    # `saved.value` (seed style); `.save()` is checked as a call (never a bare attribute)
    "value",
})

TRACER_ATTRS = frozenset({"all", "barrier", "cache", "invoke", "iter", "result", "stop"})
_VALUE_NAMES = frozenset({"output", "input", "inputs"})

GENERATE_KEYWORDS = frozenset({
    # plain decoding options; not custom_generate/trust_remote_code (they load code), nor
    # the modes transformers now loads from the hub (penalty_alpha, num_beam_groups,
    # dola_layers, constraints)
    "attention_mask", "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "do_sample",
    "early_stopping", "eos_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "max_new_tokens", "max_time", "min_length",
    "min_new_tokens", "min_p", "no_repeat_ngram_size", "num_beams", "num_return_sequences",
    "pad_token_id", "remote", "renormalize_logits", "repetition_penalty", "suppress_tokens",
    "temperature", "top_k", "top_p", "typical_p", "use_cache",
})

# Names that reach a module's parameters, buffers or state: refused with a message
# saying why (they are also not child modules).
_STATE_NAMES = frozenset({
    "apply", "bias", "buffers", "data", "get_parameter", "get_buffer", "grad_fn",
    "load_state_dict", "modules", "named_buffers", "named_modules", "named_parameters",
    "parameters", "register_buffer", "register_parameter", "requires_grad_", "state_dict",
    "weight", "zero_grad",
})
# Without ``module_names``: every public attribute of torch.nn.Module and of a
# transformers model that is not a child module (navigation accepts other names).
_MODULE_ATTRS = _STATE_NAMES | frozenset({
    "add_module", "bfloat16", "call_super_init", "children", "compile", "config", "cpu",
    "cuda", "device", "double", "dtype", "dump_patches", "eval", "extra_repr", "float",
    "forward", "generate", "generation_config", "get_extra_state", "get_submodule", "half",
    "ipu", "load_adapter", "mtia", "name_or_path", "named_children", "register_backward_hook",
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_module", "register_state_dict_pre_hook", "save_pretrained", "set_extra_state",
    "share_memory", "to", "to_empty", "tokenizer", "train", "training", "type", "xpu",
    "push_to_hub", "from_pretrained", "resize_token_embeddings", "tie_weights",
})

_ATTRS_CACHE: dict[bool, frozenset[str]] = {}


def _module_attrs() -> frozenset[str]:
    """``_MODULE_ATTRS`` and every public attribute of torch.nn.Module, of a list
    (envoy lists are lists) and, once transformers is loaded (a served model has
    loaded it), of a transformers model."""
    import sys

    loaded = "transformers" in sys.modules
    if loaded not in _ATTRS_CACHE:
        import torch

        names = set(_MODULE_ATTRS) | set(dir(list)) | set(dir(torch.nn.Module))
        if loaded:
            from transformers import PreTrainedModel

            names |= set(dir(PreTrainedModel))
        _ATTRS_CACHE[loaded] = frozenset(n for n in names if not n.startswith("_"))
    return _ATTRS_CACHE[loaded]


_WHY_STATE = ("the served model's parameters, buffers and settings cannot be reached from a "
              "remote block; a block reads and writes only `.output`, `.input` and `.inputs`")
_WHY_ENVOY = ("a module of the model can only be navigated (`.mlp`, `[0]`), iterated, "
              "measured with len(), bound to a variable, called, given to tracer.cache(), or "
              "read and written through `.output`/`.input`/`.inputs` in a remote block")

# Expression kinds.
VALUE, ENVOY, TRACER, FUNC, CLASS = "value", "envoy", "tracer", "func", "class"
HELPER = "helper"  # an @intervene helper shipped with the job: called only
_NS = "ns:"  # + dotted namespace, e.g. "ns:torch.nn"

# envoy-friendly builtins: their result holds the envoys they were given
_ENVOY_ITERS = frozenset({"enumerate", "list", "reversed", "tuple", "zip"})


class ValidationError(Exception):
    """A remote block the server refuses to run: ``line`` (in the user's file when
    the client sent its first line, else in the text sent), ``col`` (from 0),
    ``construct`` (the refused source text or name) and a plain reason."""

    filename: str | None = None  # set for a line in a helper's file (not the block's)

    def __init__(self, reason: str, line: int = 0, col: int = 0, construct: str = "") -> None:
        self.reason = reason
        self.line = line
        self.col = col
        self.construct = construct
        where = f"line {line}: " if line else ""
        what = f"`{construct}`: " if construct else ""
        super().__init__(f"{where}{what}{reason}")


class HelperSource(NamedTuple):
    """A helper shipped with a job: its source text (one function), the line of its
    first line in its file, the file's name (for messages) and the names of the values
    sent for it (the module constants and closure variables its body reads)."""

    source: str
    first_line: int = 1
    filename: str = ""
    free_names: frozenset[str] = frozenset()


def module_names_of(module) -> frozenset[str]:
    """The attribute names of every submodule of ``module`` (a ``torch.nn.Module``):
    what ``module_names`` should be for a served model."""
    names = set()
    for path, _ in module.named_modules():
        names.update(p for p in path.split(".") if p and not p.isdigit())
    # A child name that is also a method or setting of other modules (`half`, `train`)
    # would reach that method on a module without such a child: left out.
    return frozenset(names - _module_attrs())


def validate_block(
    source: str,
    block_index: int,
    *,
    free_names: Collection[str] | None = None,
    module_names: Collection[str] | None = None,
    first_line: int = 1,
    helpers: Mapping[str, HelperSource] | None = None,
) -> None:
    """Refuse block ``block_index`` of the function in ``source`` unless every part
    of it is allowed (see the module's docstring); return None when it is.

    ``free_names``: the names whose values the job sent (default: the function's
    parameters and every name it binds outside the block).  ``module_names``: the
    served model's submodule names (``module_names_of(model)``); without them a
    navigation is refused only for known non-module attributes.  ``first_line``:
    the line of ``source``'s first line in the user's file, for the messages.
    ``helpers``: the ``@intervene`` helpers shipped with the job, by the name the
    block calls them (see "Helpers" in the module's docstring); each is checked too.
    """
    if not isinstance(source, str) or not isinstance(block_index, int):
        raise ValidationError("a job needs its source text and a block number", first_line, 0,
                              "source")
    helpers = _check_sent(free_names or (), helpers, first_line)
    module, fn, positions = _parse_function(source, first_line)
    blocks = _blocks(fn)
    if not 0 <= block_index < len(blocks):
        raise ValidationError(
            f"block {block_index} does not exist: `{fn.name.value}` has {len(blocks)} "
            "trace block(s)", first_line, 0, "block index",
        )
    block = blocks[block_index]
    inside = _bound_names(block)
    if free_names is None:
        free_names = _params(fn) | (_bound_names(fn) - inside)
    names = None if module_names is None else frozenset(module_names)
    checker = _Checker(positions, first_line, block, inside, frozenset(free_names), names,
                       frozenset(helpers) - inside)
    checker.run()
    _check_compiles(source, module, positions, first_line, block_index, positions[block][0])
    if helpers:
        _check_helpers(helpers, checker.calls, names)


def _check_names(names: Iterable, first_line: int, what: str) -> None:
    for name in names:
        # The server writes these names into a function's parameters: plain names only.
        if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)
                and unicodedata.normalize("NFKC", name) == name and not name.startswith("__")):
            raise ValidationError(f"{what} under the name {name!r}, which is not a "
                                  "plain variable name", first_line, 0, str(name)[:60])


def _check_sent(free_names, helpers, first_line: int) -> dict:
    """The names a job sent (values and helpers) are plain names, none sent as both;
    the helpers as a dict."""
    helpers = dict(helpers or {})
    _check_names(free_names, first_line, "a value was sent")
    _check_names(helpers, first_line, "a helper was sent")
    both = sorted(set(helpers) & set(free_names))
    if both:
        raise ValidationError(f"`{both[0]}` was sent both as a value and as a helper",
                              first_line, 0, both[0])
    return helpers


def _parse_function(source: str, first_line: int) -> tuple[cst.Module, cst.FunctionDef, dict]:
    """The checks before and while parsing; the one function the text must be."""
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        raise ValidationError(
            f"the source is {size} bytes; a remote job takes at most {MAX_SOURCE_BYTES}",
            first_line, 0, "source",
        )
    _check_characters(source, first_line)
    statement_count = _check_depth(source, first_line)
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        line, col = parse_error_position(exc)
        raise ValidationError(f"cannot parse: {exc.message}", first_line + line - 1, col,
                              "syntax") from None
    positions = walk.positions(module)
    _check_same_reading(module, positions, statement_count, first_line)
    fns = list(module.body)
    if len(fns) != 1 or not isinstance(fns[0], cst.FunctionDef):
        raise ValidationError(
            "a remote job's source must be exactly one function definition (the "
            "@intervene function), and nothing else", first_line, 0, "source",
        )
    fn = fns[0]
    if fn.asynchronous is not None:
        raise ValidationError("an `async def` cannot run remotely (the model runs "
                              "synchronously)", first_line, 0, "async def")
    return module, fn, positions


# -- before parsing ------------------------------------------------------------


# (U+0085, U+2028, U+2029: `str.splitlines`, with which the server cuts the block out
# of the text, ends a line there; Python's tokenizer does not)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")


def _check_characters(source: str, first_line: int) -> None:
    """No control characters but tab and line ends, nor line separators Python does not
    end a line at: nothing on which two parsers could split lines differently."""
    found = _CONTROL.search(source)
    if found is not None:
        before = source[: found.start()]
        raise ValidationError(
            f"the control character {found.group()!r} is not allowed in a remote job's source",
            first_line + before.count("\n"), found.start() - (before.rfind("\n") + 1),
            "source")


def _check_depth(source: str, first_line: int) -> int:
    """Python's parser refuses absurd nesting by itself (a SyntaxError, never a
    crash); the depth of its tree is then measured without recursion.  Returns the
    number of statements Python reads (checked against libcst's reading)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValidationError(f"cannot parse: {exc.msg}", first_line + (exc.lineno or 1) - 1,
                              max((exc.offset or 1) - 1, 0), "syntax") from None
    except (RecursionError, MemoryError, ValueError):
        raise ValidationError(f"the source nests deeper than {MAX_DEPTH} levels",
                              first_line, 0, "nesting") from None
    todo = [(tree, 0, 1, 0)]
    count = 0
    while todo:
        node, depth, line, col = todo.pop()
        line, col = getattr(node, "lineno", line), getattr(node, "col_offset", col)
        if depth > MAX_DEPTH:
            raise ValidationError(f"the source nests deeper than {MAX_DEPTH} levels",
                                  first_line + line - 1, col, "nesting")
        count += isinstance(node, ast.stmt)
        todo.extend((child, depth + 1, line, col) for child in ast.iter_child_nodes(node))
    return count


class _Identifiers(cst.CSTVisitor):
    """Counts statements; finds identifiers Python would read as other names."""

    def __init__(self) -> None:
        super().__init__()
        self.statements = 0
        self.odd: cst.Name | None = None

    def _statement(self, node: cst.CSTNode) -> None:
        self.statements += 1

    def visit_Name(self, node: cst.Name) -> None:
        if (self.odd is None and not node.value.isascii()
                and unicodedata.normalize("NFKC", node.value) != node.value):
            self.odd = node


def _statement_types() -> set[type]:
    found: set[type] = set()
    todo = [cst.BaseSmallStatement, cst.BaseCompoundStatement]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


for _t in _statement_types():  # every statement type counts, as `ast.stmt` does
    setattr(_Identifiers, f"visit_{_t.__name__}", _Identifiers._statement)


def _check_same_reading(module: cst.Module, positions: dict, statements: int,
                        first_line: int) -> None:
    """libcst reads the text as Python does: the same number of statements, and
    every identifier as written (Python reads ``ｔｏｒｃｈ`` as ``torch``: NFKC)."""
    found = _Identifiers()
    walk.visit(found, module)
    if found.odd is not None:
        line, col = positions[found.odd][:2]
        name = found.odd.value
        raise ValidationError(
            f"Python reads this name as `{unicodedata.normalize('NFKC', name)}`: write "
            "names in their plain form in remote blocks", first_line + line - 1, col, name)
    if found.statements != statements:
        raise ValidationError("the source reads differently to Python and to the compiler",
                              first_line, 0, "source")


def _check_compiles(source: str, module: cst.Module, positions: dict, first_line: int,
                    index: int, block_line: int) -> None:
    """The compiler's own checks, and the same block numbering as the plan's."""
    from .analyze import analyze

    try:
        info = analyze(Source(source, "<remote>", first_line, 0), module, positions)
    except CompileError as exc:
        raise ValidationError(exc.message, exc.lineno or first_line,
                              max((exc.offset or 1) - 1, 0), "compile error") from None
    if index >= len(info.blocks) or info.blocks[index].line != first_line + block_line - 1:
        raise ValidationError("the compiler numbers this function's blocks differently",
                              first_line, 0, "block index")


# -- names a tree binds ----------------------------------------------------------


def _target_names(t: cst.CSTNode) -> Iterable[str]:
    if isinstance(t, cst.Name):
        yield t.value
    elif isinstance(t, (cst.Tuple, cst.List)):
        for el in t.elements:
            yield from _target_names(el.value)
    elif isinstance(t, cst.StarredElement):
        yield from _target_names(t.value)


class _Binds(cst.CSTVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
        self.names.update(_target_names(node.target))

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self.names.update(_target_names(node.target))

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self.names.update(_target_names(node.target))

    def visit_For(self, node: cst.For) -> None:
        self.names.update(_target_names(node.target))

    def visit_CompFor(self, node: cst.CompFor) -> None:
        self.names.update(_target_names(node.target))

    def visit_AsName(self, node: cst.AsName) -> None:
        self.names.update(_target_names(node.name))

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        self.names.update(_target_names(node.target))

    def visit_MatchAs(self, node: cst.MatchAs) -> None:
        if node.name is not None:
            self.names.add(node.name.value)

    def visit_MatchStar(self, node: cst.MatchStar) -> None:
        if node.name is not None:
            self.names.add(node.name.value)

    def visit_MatchMapping(self, node: cst.MatchMapping) -> None:
        if node.rest is not None:
            self.names.add(node.rest.value)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.names.add(node.name.value)

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.names.add(node.name.value)

    def visit_ImportAlias(self, node: cst.ImportAlias) -> None:
        target = node.asname.name if node.asname is not None else node.name
        while isinstance(target, cst.Attribute):
            target = target.value
        self.names.update(_target_names(target))


def _bound_names(node: cst.CSTNode) -> set[str]:
    binds = _Binds()
    walk.visit(binds, node)
    return binds.names


def _params(fn: cst.FunctionDef) -> set[str]:
    p = fn.params
    out = {x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)}
    for star in (p.star_arg, p.star_kwarg):
        if isinstance(star, cst.Param):
            out.add(star.name.value)
    return out


# -- the check ---------------------------------------------------------------------

_CODE = cst.Module([])


def _text(node: cst.CSTNode, limit: int = 60) -> str:
    text = " ".join(_CODE.code_for_node(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_PASSES = 10


class _Refused(Exception):
    pass


class _Checker:
    """Walks one block.  Kinds of expressions are inferred first (which variables
    may hold envoys: a fixpoint over the block's bindings, errors ignored), then
    the block is walked once more and the first refused construct raises."""

    def __init__(self, positions, first_line, block, inside, free, module_names,
                 helpers: frozenset[str] = frozenset()) -> None:
        self._setup(positions, first_line, block, inside, free, module_names, helpers)
        self.call = block_call(block)
        self.model = self.call.func.value.value if isinstance(self.call.func.value, cst.Name) else None
        self.item_index = block_item(block)  # `with model.trace(x) as t, torch.no_grad():`
        asname = block.items[self.item_index].asname
        self.tracer = asname.name.value if asname is not None and isinstance(asname.name, cst.Name) else None

    def _setup(self, positions, first_line, block, inside, free, module_names, helpers) -> None:
        """What every checker has (a block's and a helper's, ``_HelperChecker``)."""
        self.positions = positions
        self.first_line = first_line
        self.block = block
        self.inside = inside
        self.free = free
        self.module_names = module_names
        self.envoy_names: set[str] = set()
        self.strict = False
        self.helpers = helpers  # names of the helpers shipped with the job
        self.calls: list = []  # (helper, [(keyword, star, kind) per argument], node)
        self.recording = False  # note the helper calls (in the last pass)

    # -- reporting ---------------------------------------------------------
    def refuse(self, node: cst.CSTNode, construct: str, reason: str) -> None:
        if not self.strict:
            raise _Refused
        pos = self.positions.get(node, (1, 0))
        raise ValidationError(reason, self.first_line + pos[0] - 1, pos[1], construct)

    # -- driver ------------------------------------------------------------
    def run(self) -> None:
        if self.model is None:
            self.strict = True
            self.refuse(self.call.func.value, _text(self.call.func.value),
                        "the model of a remote block must be a plain name "
                        "(`with model.trace(...)`)")
        if self.tracer is not None and self.tracer in (
                {self.model, "torch", "math", "save"} | SAFE_BUILTINS | FORBIDDEN_NAMES):
            self.strict = True
            self.refuse(self.block.items[self.item_index].asname.name, self.tracer,
                        f"`{self.tracer}` is provided by the server: name the tracer otherwise")
        self.strict = False
        for _ in range(_MAX_PASSES):  # envoy-holding names: grows until stable
            before = set(self.envoy_names)
            self._walk_with_recovery(self.block)
            if self.envoy_names == before:
                break
        else:  # each pass follows one more alias: real code is stable after two or three
            self.strict = True
            self.refuse(self.block, "aliases", "the block passes modules through too many "
                        f"variables (over {_MAX_PASSES} in a chain) to be checked: use the "
                        "module's path")
        self.strict = True
        self.recording = True
        self.with_stmt(self.block, header=True)

    def _walk_with_recovery(self, node: cst.CSTNode) -> None:
        """The inference pass: every statement is visited, refused or not."""
        if isinstance(node, cst.With):
            for i, item in enumerate(node.items):
                self._try(lambda item=item, i=i: self.with_item(
                    item, node is self.block and i == self.item_index))
            body = node.body.body
        else:
            body = getattr(getattr(node, "body", None), "body", None) or ()
        for stmt in body:
            self._try(lambda stmt=stmt: self.stmt(stmt))

    def _try(self, fn) -> None:
        try:
            fn()
        except _Refused:
            pass

    # -- statements ------------------------------------------------------------
    def body(self, suite: cst.BaseSuite) -> None:
        for stmt in suite.body:
            self.stmt(stmt)

    def stmt(self, node: cst.CSTNode) -> None:
        if isinstance(node, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
            for small in node.body:
                self.small(small)
        elif isinstance(node, cst.If):
            self.expr(node.test)
            self.body(node.body)
            if node.orelse is not None:
                if isinstance(node.orelse, cst.If):
                    self.stmt(node.orelse)
                else:
                    self.body(node.orelse.body)
        elif isinstance(node, cst.For):
            if node.asynchronous is not None:
                self.refuse(node, "async for", "`async` is not allowed in remote blocks")
            kinds = self.iter_kinds(node.iter, node.target)
            self.bind(node.target, kinds)
            self.body(node.body)
            if node.orelse is not None:
                self.body(node.orelse.body)
        elif isinstance(node, cst.While):
            self.expr(node.test)
            self.body(node.body)
            if node.orelse is not None:
                self.body(node.orelse.body)
        elif isinstance(node, cst.With):
            self.with_stmt(node)
        elif isinstance(node, cst.Try):
            self.body(node.body)
            for handler in node.handlers:
                if handler.type is None:
                    self.refuse(handler, "except:", "a bare `except:` is not allowed in remote "
                                "blocks (it would catch the server's own signals): name the "
                                "exception class, e.g. `except ValueError:`")
                self.expr(handler.type)
                if handler.name is not None:
                    self.bind(handler.name.name, VALUE)
                self.body(handler.body)
            if node.orelse is not None:
                self.body(node.orelse.body)
            if node.finalbody is not None:
                self.body(node.finalbody.body)
        elif isinstance(node, cst.FunctionDef):
            self.refuse(node, f"def {node.name.value}", "function definitions are not allowed "
                        "in remote blocks")
        elif isinstance(node, cst.ClassDef):
            self.refuse(node, f"class {node.name.value}", "class definitions are not allowed "
                        "in remote blocks")
        elif isinstance(node, cst.Match):
            self.expr(node.subject)
            for case in node.cases:
                self.pattern(case.pattern)
                if case.guard is not None:
                    self.expr(case.guard)
                self.body(case.body)
        else:
            name = type(node).__name__
            self.refuse(node, _text(node, 30), f"`{name}` statements are not allowed in remote blocks")

    def small(self, node: cst.BaseSmallStatement) -> None:
        if isinstance(node, cst.Expr):
            self.expr(node.value)
        elif isinstance(node, cst.Assign):
            kind = self.expr(node.value, envoy_ok=all(
                isinstance(t.target, (cst.Name, cst.Tuple, cst.List)) for t in node.targets))
            for t in node.targets:
                self.store(t.target, kind, node.value)
        elif isinstance(node, cst.AnnAssign):
            self.expr(node.annotation.annotation, owner=True)  # not evaluated; still checked
            kind = VALUE
            if node.value is not None:
                kind = self.expr(node.value, envoy_ok=isinstance(node.target, cst.Name))
            self.store(node.target, kind, node.value)
        elif isinstance(node, cst.AugAssign):
            self.expr(node.value)
            self.store(node.target, VALUE, node.value, augmented=True)
        elif isinstance(node, cst.Del):
            self.delete(node.target)
        elif isinstance(node, (cst.Pass, cst.Break, cst.Continue)):
            pass
        elif isinstance(node, cst.Raise):
            if node.exc is not None:
                self.expr(node.exc)
            if node.cause is not None:
                self.expr(node.cause.item)
        elif isinstance(node, cst.Assert):
            self.expr(node.test)
            if node.msg is not None:
                self.expr(node.msg)
        elif isinstance(node, (cst.Import, cst.ImportFrom)):
            self.refuse(node, _text(node), "imports are not allowed in remote blocks (`torch` "
                        "and `math` are there already)")
        elif isinstance(node, (cst.Global, cst.Nonlocal)):
            word = "global" if isinstance(node, cst.Global) else "nonlocal"
            self.refuse(node, _text(node), f"`{word}` is not allowed in remote blocks")
        elif isinstance(node, cst.Return):
            self.refuse(node, "return", "`return` is not allowed in a trace block")
        else:
            name = type(node).__name__
            self.refuse(node, _text(node, 30), f"`{name}` statements are not allowed in remote blocks")

    def with_stmt(self, node: cst.With, header: bool = False) -> None:
        if node.asynchronous is not None:
            self.refuse(node, "async with", "`async` is not allowed in remote blocks")
        for i, item in enumerate(node.items):
            self.with_item(item, header and i == self.item_index)
        self.body(node.body)

    def with_item(self, item: cst.WithItem, header: bool) -> None:
        if header:
            self.header(item.item)
        else:
            self.expr(item.item)
        if item.asname is not None and not header:
            self.bind(item.asname.name, VALUE)

    def header(self, call: cst.Call) -> None:
        kind = call.func.attr.value
        for arg in call.args:
            if kind == "generate" or self._invokes_generate():
                self.generate_arg(arg)
            self.expr(arg.value)

    def _invokes_generate(self) -> bool:
        return self.call.func.attr.value == "generate"

    def generate_arg(self, arg: cst.Arg) -> None:
        if arg.star == "**":
            self.refuse(arg, _text(arg), "`**` options are not allowed for a remote "
                        "`generate`: write each option (allowed: "
                        f"{', '.join(sorted(GENERATE_KEYWORDS))})")
        if arg.keyword is not None and arg.keyword.value not in GENERATE_KEYWORDS:
            self.refuse(arg.keyword, arg.keyword.value, "this `generate` option is not "
                        "allowed in remote blocks (allowed: "
                        f"{', '.join(sorted(GENERATE_KEYWORDS))})")

    def pattern(self, node: cst.CSTNode) -> None:
        """A ``case`` pattern.  Class patterns read attributes (keywords, and
        ``__match_args__`` for positions): only builtin classes, by position."""
        if isinstance(node, cst.MatchValue):
            self.expr(node.value)
        elif isinstance(node, cst.MatchSingleton):
            pass
        elif isinstance(node, cst.MatchAs):
            if node.pattern is not None:
                self.pattern(node.pattern)
            if node.name is not None:
                self.bind(node.name, VALUE)
        elif isinstance(node, cst.MatchOr):
            for el in node.patterns:
                self.pattern(el.pattern)
        elif isinstance(node, (cst.MatchList, cst.MatchTuple)):
            for el in node.patterns:
                if isinstance(el, cst.MatchStar):
                    if el.name is not None:
                        self.bind(el.name, VALUE)
                else:
                    self.pattern(el.value)
        elif isinstance(node, cst.MatchMapping):
            for el in node.elements:
                self.expr(el.key)
                self.pattern(el.pattern)
            if node.rest is not None:
                self.bind(node.rest, VALUE)
        elif isinstance(node, cst.MatchClass):
            kind = self.expr(node.cls, class_ok=True)
            builtin = isinstance(node.cls, cst.Name) and kind == FUNC
            if node.kwds or (node.patterns and not builtin):
                self.refuse(node, _text(node), "in remote blocks a class pattern takes a "
                            "builtin class and positional patterns only (`case str(s):`); "
                            "keywords would read attributes")
            for el in node.patterns:
                self.pattern(el.value)
        else:
            self.refuse(node, _text(node), "this pattern is not allowed in remote blocks")

    # -- targets -----------------------------------------------------------------
    def bind(self, target: cst.CSTNode, kind) -> None:
        """Bind the names of a for/with/comprehension target; ``kind`` is one kind or,
        for a tuple target, a tuple of kinds (one per element)."""
        if isinstance(target, cst.Name):
            k = ENVOY if (kind == ENVOY or (isinstance(kind, tuple) and ENVOY in kind)) else VALUE
            self.bind_name(target, k)
        elif isinstance(target, (cst.Tuple, cst.List)):
            els = target.elements
            for i, el in enumerate(els):
                if isinstance(kind, tuple) and len(kind) == len(els):
                    sub = kind[i]
                else:
                    sub = ENVOY if (kind == ENVOY or (isinstance(kind, tuple) and ENVOY in kind)) else VALUE
                self.bind(el.value, sub)
        elif isinstance(target, cst.StarredElement):
            self.bind(target.value, kind)
        else:  # `for xs[0] in ...`, `for m.output in ...`
            envoy = kind == ENVOY or (isinstance(kind, tuple) and ENVOY in kind)
            self.store(target, ENVOY if envoy else VALUE, None)

    def bind_name(self, node: cst.Name, kind: str) -> None:
        name = node.value
        if name.startswith("__"):
            self.refuse(node, name, "names starting with `__` are not allowed in remote blocks")
        provided = {self.model, self.tracer, "torch", "math", "save"} | SAFE_BUILTINS | CONSTANT_NAMES
        if name in provided or name in FORBIDDEN_NAMES:
            self.refuse(node, name, f"`{name}` is provided by the server and cannot be "
                        "assigned in a remote block: choose another name")
        if kind == ENVOY:
            self.envoy_names.add(name)

    def store(self, target: cst.CSTNode, kind: str, value: cst.CSTNode | None,
              augmented: bool = False) -> None:
        if isinstance(target, (cst.Name, cst.Tuple, cst.List, cst.StarredElement)):
            if isinstance(target, (cst.Tuple, cst.List)) and isinstance(value, (cst.Tuple, cst.List)):
                kinds = tuple(self.kind_quiet(el.value) for el in value.elements)
                self.bind(target, kinds)
            else:
                self.bind(target, kind)
            return
        if kind == ENVOY:  # a module must not hide in an item or an attribute
            where = value if value is not None else target
            self.refuse(where, _text(where), _WHY_ENVOY)
        if isinstance(target, cst.Attribute):
            attr = target.attr.value
            owner = self.expr(target.value, owner=True)
            if attr.startswith("_"):
                self.refuse(target.attr, attr, "attributes starting with `_` are not allowed "
                            "in remote blocks")
            if owner == ENVOY and attr in _VALUE_NAMES:
                return
            if owner == VALUE and attr in ("grad", "requires_grad"):
                return
            if owner == ENVOY and attr in _STATE_NAMES:
                self.refuse(target.attr, attr, _WHY_STATE)
            self.refuse(target.attr, attr, "only `.output`, `.input` and `.inputs` of a "
                        "module, and `.grad` and `.requires_grad` of a value, can be assigned "
                        "in remote blocks")
        elif isinstance(target, cst.Subscript):
            owner = self.expr(target.value, owner=True)
            if owner != VALUE:
                self.refuse(target, _text(target), "modules cannot be replaced or changed in "
                            "remote blocks: write to `.output`/`.input`/`.inputs` instead"
                            if owner == ENVOY else "this item cannot be assigned")
            self.slices(target)
        else:
            self.refuse(target, _text(target), "this assignment target is not allowed in "
                        "remote blocks")

    def delete(self, target: cst.CSTNode) -> None:
        if isinstance(target, cst.Name):
            return
        if isinstance(target, (cst.Tuple, cst.List)):
            for el in target.elements:
                self.delete(el.value)
            return
        if isinstance(target, cst.Subscript) and self.expr(target.value, owner=True) == VALUE:
            self.slices(target)
            return
        self.refuse(target, f"del {_text(target)}", "only variables and items of values can "
                    "be deleted in remote blocks")

    # -- expressions -------------------------------------------------------------
    def kind_quiet(self, node: cst.CSTNode) -> str:
        strict, self.strict = self.strict, False
        try:
            return self.expr(node, owner=True)
        except _Refused:
            return VALUE
        finally:
            self.strict = strict

    def iter_kinds(self, it: cst.CSTNode, target: cst.CSTNode):
        """The kind(s) of what iterating ``it`` gives: a tuple of kinds for
        ``enumerate(...)`` / ``zip(...)`` unpacked into a tuple target."""
        kind = self.expr(it, envoy_ok=True)
        if (isinstance(it, cst.Call) and isinstance(it.func, cst.Name)
                and isinstance(target, (cst.Tuple, cst.List))
                and self.name_kind(it.func, quiet=True) == FUNC):
            fname = it.func.value
            args = [a for a in it.args if a.keyword is None and not a.star]
            if fname == "enumerate" and len(args) == 1:
                return (VALUE, self.kind_quiet(args[0].value))
            if fname == "zip" and len(args) == len(it.args):
                return tuple(self.kind_quiet(a.value) for a in args)
        return kind

    def expr(self, node: cst.CSTNode, envoy_ok: bool = False, *, owner: bool = False,
             class_ok: bool = False) -> str:
        """Check ``node``; its kind.  ``envoy_ok``: it may be an envoy (navigated,
        bound, iterated...); ``owner``: it is the object of an attribute, call or
        index (the only place a namespace, the tracer or a class may appear, so none
        of them can be aliased or passed on); ``class_ok``: isinstance's classes."""
        kind = self._expr(node, class_ok or owner)
        if kind == ENVOY and not (envoy_ok or owner):
            self.refuse(node, _text(node), _WHY_ENVOY)
        if kind.startswith(_NS) and not owner:
            self.refuse(node, _text(node), "a module (namespace) cannot be used as a value in "
                        "remote blocks: call its listed functions")
        if kind == TRACER and not owner:
            self.refuse(node, _text(node), "the tracer can only be used through its methods "
                        f"({', '.join(sorted(TRACER_ATTRS))})")
        if kind == HELPER and not owner:
            self.refuse(node, _text(node), "an @intervene helper can only be called in remote "
                        "blocks (`helper(model, ...)`), not passed on or bound to a variable")
        if kind == CLASS and not (owner or class_ok):
            self.refuse(node, _text(node), "a class can only be used in isinstance() in "
                        "remote blocks")
        return kind

    def _expr(self, node: cst.CSTNode, class_ok: bool = False) -> str:
        if isinstance(node, cst.Name):
            return self.name_kind(node)
        if isinstance(node, cst.Attribute):
            return self.attribute(node)
        if isinstance(node, cst.Subscript):
            owner = self.expr(node.value, owner=True)
            self.slices(node)
            if owner.startswith(_NS) or owner in (TRACER, HELPER):
                self.refuse(node, _text(node), "this cannot be indexed in remote blocks")
            return ENVOY if owner == ENVOY else VALUE
        if isinstance(node, cst.Call):
            return self.call_expr(node)
        if isinstance(node, (cst.Integer, cst.Float, cst.Imaginary, cst.SimpleString,
                             cst.Ellipsis)):
            return VALUE
        if isinstance(node, cst.ConcatenatedString):
            self.expr(node.left)
            self.expr(node.right)
            return VALUE
        if isinstance(node, cst.FormattedString):
            for part in node.parts:
                self.fstring_part(part)
            return VALUE
        if isinstance(node, (cst.List, cst.Tuple)):
            kinds = [self.expr(el.value, envoy_ok=True, class_ok=class_ok)
                     for el in node.elements]
            return ENVOY if ENVOY in kinds else VALUE
        if isinstance(node, cst.Set):
            for el in node.elements:
                self.expr(el.value)
            return VALUE
        if isinstance(node, cst.Dict):
            for el in node.elements:
                if isinstance(el, cst.DictElement):
                    self.expr(el.key)
                self.expr(el.value)
            return VALUE
        if isinstance(node, cst.StarredElement):
            return self.expr(node.value, envoy_ok=True)
        if isinstance(node, (cst.ListComp, cst.GeneratorExp, cst.SetComp, cst.DictComp)):
            return self.comprehension(node)
        if isinstance(node, cst.BinaryOperation):
            self.expr(node.left)
            self.expr(node.right)
            return VALUE
        if isinstance(node, cst.UnaryOperation):
            self.expr(node.expression)
            return VALUE
        if isinstance(node, cst.BooleanOperation):
            self.expr(node.left)
            self.expr(node.right)
            return VALUE
        if isinstance(node, cst.Comparison):
            self.expr(node.left)
            for target in node.comparisons:
                self.expr(target.comparator)
            return VALUE
        if isinstance(node, cst.IfExp):
            self.expr(node.test)
            a = self.expr(node.body, envoy_ok=True)
            b = self.expr(node.orelse, envoy_ok=True)
            return ENVOY if ENVOY in (a, b) else VALUE
        if isinstance(node, cst.NamedExpr):
            kind = self.expr(node.value, envoy_ok=True)
            self.bind(node.target, kind)
            return kind
        if isinstance(node, cst.Lambda):
            self.refuse(node, "lambda", "`lambda` is not allowed in remote blocks")
        if isinstance(node, (cst.Yield, cst.Await)):
            word = "yield" if isinstance(node, cst.Yield) else "await"
            self.refuse(node, word, f"`{word}` is not allowed in remote blocks")
        self.refuse(node, _text(node), f"`{type(node).__name__}` expressions are not allowed "
                    "in remote blocks")
        return VALUE

    def fstring_part(self, part: cst.CSTNode) -> None:
        if isinstance(part, cst.FormattedStringExpression):
            self.expr(part.expression)
            for sub in part.format_spec or ():
                self.fstring_part(sub)

    def slices(self, node: cst.Subscript) -> None:
        for el in node.slice:
            s = el.slice
            if isinstance(s, cst.Index):
                self.expr(s.value)
            else:
                for part in (s.lower, s.upper, s.step):
                    if part is not None:
                        self.expr(part)

    def comprehension(self, node) -> str:
        fors = []
        comp = node.for_in
        while comp is not None:
            fors.append(comp)
            comp = comp.inner_for_in
        for comp in fors:
            kinds = self.iter_kinds(comp.iter, comp.target)
            self.bind(comp.target, kinds)
            for cond in comp.ifs:
                self.expr(cond.test)
        if isinstance(node, cst.DictComp):
            self.expr(node.key)
            self.expr(node.value)
            return VALUE
        kind = self.expr(node.elt, envoy_ok=isinstance(node, (cst.ListComp, cst.GeneratorExp)))
        return ENVOY if kind == ENVOY else VALUE

    def name_kind(self, node: cst.Name, quiet: bool = False) -> str:
        name = node.value
        if name.startswith("__"):
            self.refuse(node, name, "names starting with `__` are not allowed in remote blocks")
        if name in FORBIDDEN_NAMES:
            self.refuse(node, name, f"`{name}` is not allowed in remote blocks")
        if name in CONSTANT_NAMES:
            return VALUE
        if name == self.model:
            return ENVOY
        if name == self.tracer:
            return TRACER
        if name in ("torch", "math"):
            return _NS + name
        if name in self.inside:
            return ENVOY if name in self.envoy_names else VALUE
        if name in SAFE_BUILTINS or name == "save":
            # before the values sent: a value sent under a builtin's name is plain data,
            # which can do less than the builtin
            return FUNC
        if name in self.helpers:
            return HELPER
        if name in self.free:
            return VALUE
        if quiet:
            return VALUE
        self.refuse(node, name, f"`{name}` is not defined in the block and its value was not "
                    "sent with the job; a remote block can use its own variables, the values "
                    f"sent, {f'`{self.model}`, ' if self.model else 'the helpers sent, '}"
                    "`torch`, `math` and common builtins (len, range, "
                    "zip, print...)")
        return VALUE

    def attribute(self, node: cst.Attribute) -> str:
        attr = node.attr.value
        owner = self.expr(node.value, owner=True)  # first: the leftmost mistake is named
        if attr.startswith("_"):
            self.refuse(node.attr, attr, "attributes starting with `_` are not allowed in "
                        "remote blocks")
        if owner == ENVOY:
            return self.envoy_attribute(node, attr)
        if owner == TRACER:
            if attr in TRACER_ATTRS:
                return VALUE
            self.refuse(node.attr, attr, "this tracer attribute is not allowed in remote "
                        f"blocks (allowed: {', '.join(sorted(TRACER_ATTRS))})")
        if owner.startswith(_NS):
            return self.namespace_attribute(node, owner[len(_NS):], attr)
        if owner in (FUNC, CLASS, HELPER):
            self.refuse(node.attr, attr, f"attributes of `{_text(node.value)}` are not "
                        "allowed in remote blocks")
        if attr in VALUE_ATTRS:
            return VALUE
        if attr in ("format", "format_map"):
            self.refuse(node.attr, attr, "`.format` is not allowed in remote blocks (its "
                        "fields can read attributes): use an f-string")
        if attr in _STATE_NAMES:
            self.refuse(node.attr, attr, f"`.{attr}` is not allowed in remote blocks: "
                        + _WHY_STATE)
        self.refuse(node.attr, attr, f"`.{attr}` is not an allowed method or attribute in "
                    "remote blocks (tensor math, list/dict/str methods and `.save()` are)")
        return VALUE

    def envoy_attribute(self, node: cst.Attribute, attr: str) -> str:
        if attr in _VALUE_NAMES:
            return VALUE
        if attr == "generator" and isinstance(node.value, cst.Name) and node.value.value == self.model:
            return ENVOY
        if attr == "streamer" and _text(node.value) == f"{self.model}.generator":
            return ENVOY  # each step's new tokens (runtime/language.py)
        if attr in _STATE_NAMES:
            self.refuse(node.attr, attr, _WHY_STATE)
        if attr == "source" and (self.module_names is None or attr not in self.module_names):
            self.refuse(node.attr, attr, "`.source` (a module's forward operations) is not "
                        "available in remote blocks yet (a call site hands over what the "
                        "forward passes, the module itself and functions among them): read "
                        "the module's own `.output` / `.input`, or run this block locally")
        if self.module_names is not None:
            if attr in self.module_names:
                return ENVOY
            self.refuse(node.attr, attr, f"`{attr}` is not a module of the served model; "
                        + _WHY_ENVOY)
        elif attr not in _module_attrs():
            return ENVOY
        self.refuse(node.attr, attr, f"`.{attr}` of a module is not allowed in remote "
                    "blocks: " + _WHY_STATE)
        return VALUE

    def save_call(self, node: cst.Call, func: cst.Attribute) -> str:
        """``x.save()``: the compiler's own marker (rewritten, never a method call)."""
        owner = self.expr(func.value, owner=True)
        if owner.startswith(_NS) or owner in (TRACER, FUNC, CLASS, HELPER):
            self.attribute(func)  # `torch.save(...)`: refused as the attribute it is
        if node.args:
            self.refuse(node, _text(node), "`.save()` takes no arguments (it keeps the value "
                        "after the block; nothing is written to disk)")
        if owner != VALUE:
            self.refuse(func.attr, "save", "only values can be saved in remote blocks (a "
                        "module's `.output`, not the module)")
        return VALUE

    def namespace_attribute(self, node: cst.Attribute, ns: str, attr: str) -> str:
        full = f"{ns}.{attr}"
        if full in _TORCH_SUBMODULES:
            return _NS + full
        allowed = (TORCH_FUNCTIONS if ns == "torch" else MATH_NAMES if ns == "math"
                   else _TORCH_SUBMODULES.get(ns, frozenset()))
        if ns == "torch" and attr in _TORCH_CLASSES:
            return CLASS
        if attr in allowed:
            return FUNC
        self.refuse(node, full, f"`{full}` is not allowed in remote blocks (only listed "
                    "tensor math, creation and grad-mode functions of torch are)")
        return VALUE

    def call_expr(self, node: cst.Call) -> str:
        func = node.func
        if isinstance(func, cst.Attribute) and func.attr.value == "save":
            return self.save_call(node, func)
        fkind = self.expr(func, owner=True)
        class_args = fkind == FUNC and isinstance(func, cst.Name) and func.value == "isinstance"
        envoy_args = False
        result = VALUE
        if fkind == CLASS:
            self.refuse(node, _text(node), "`torch.Tensor(...)` is not allowed in remote "
                        "blocks (it may hold memory left by earlier jobs): use torch.zeros, "
                        "torch.tensor")
        elif fkind.startswith(_NS) or fkind == TRACER:
            self.refuse(node, _text(node), "this cannot be called in remote blocks")
        elif fkind == HELPER:
            envoy_args = True  # the helper is checked with what each parameter gets
        elif fkind == FUNC and isinstance(func, cst.Name):
            if func.value == "len":
                envoy_args = True
            elif func.value in _ENVOY_ITERS:
                envoy_args = True
                result = None  # decided by the arguments
        elif isinstance(func, cst.Attribute) and self.kind_quiet(func.value) == TRACER:
            envoy_args = func.attr.value == "cache"
            if func.attr.value == "invoke" and self._invokes_generate():
                for arg in node.args:
                    self.generate_arg(arg)
        kinds = [self.expr(arg.value, envoy_ok=envoy_args, class_ok=class_args and i == 1)
                 for i, arg in enumerate(node.args)]
        if fkind == HELPER and self.recording:
            self.calls.append((func.value, [
                (a.keyword.value if a.keyword is not None else None, a.star, k)
                for a, k in zip(node.args, kinds)], node))
        if result is None:
            result = ENVOY if ENVOY in kinds else VALUE
        return result


# -- helpers ---------------------------------------------------------------------


def _check_helpers(helpers: dict[str, HelperSource], calls: list,
                   module_names: frozenset[str] | None) -> None:
    """Check every helper shipped with a job.  Which parameters may hold modules
    comes from the calls (the block's and the helpers' own): a parameter given a
    module anywhere is a module in the helper's check, every other one a value.
    A helper is checked again when one of its parameters newly gets a module,
    until nothing changes (parameters only ever gain modules, so this ends)."""
    parsed = {}
    for name, spec in helpers.items():
        if not isinstance(spec, HelperSource):
            spec = HelperSource(*spec)
        try:
            _module, fn, positions = _parse_function(spec.source, spec.first_line)
            if _blocks(fn):
                raise ValidationError(
                    "a helper shipped with a remote block cannot have a block of its own",
                    spec.first_line, 0, f"def {fn.name.value}")
            _check_names(spec.free_names, spec.first_line, "a value was sent")
            if name in _PROVIDED:
                raise ValidationError(f"`{name}` is provided by the server: a helper cannot "
                                      "be called so in a remote block", spec.first_line, 0,
                                      name)
        except ValidationError as exc:
            raise _in_helper(exc, name, spec) from None
        parsed[name] = (spec, fn, positions)
    envoys: dict[str, set[str]] = {name: set() for name in parsed}

    def apply(found: list) -> set[str]:
        """Mark the parameters given modules by ``found`` calls; the helpers changed."""
        changed = set()
        for callee, args, _node in found:
            if callee not in parsed:
                continue
            got = _params_given_modules(parsed[callee][1], args)
            if not got <= envoys[callee]:
                envoys[callee] |= got
                changed.add(callee)
        return changed

    def checker(name: str) -> _HelperChecker:
        spec, fn, positions = parsed[name]
        return _HelperChecker(positions, spec.first_line, fn, frozenset(spec.free_names),
                              module_names, frozenset(parsed) - frozenset(spec.free_names),
                              envoys[name])

    apply(calls)
    # First what each parameter gets (no error yet: a refusal may only mean that a
    # parameter's module is not known yet), then each helper's strict check.
    todo = list(parsed)
    for _ in range(sum(len(_params(f)) for _s, f, _p in parsed.values()) + len(parsed) + 1):
        if not todo:
            break
        name = todo.pop()
        found = checker(name)
        found.run(strict=False)
        todo.extend(h for h in apply(found.calls) if h not in todo)
    for name, (spec, _fn, _positions) in parsed.items():
        found = checker(name)
        try:
            found.run(strict=True)
        except ValidationError as exc:
            raise _in_helper(exc, name, spec) from None
        if apply(found.calls):  # pragma: no cover - the first loop saw these calls
            raise ValidationError("the helpers pass modules to each other in ways that "
                                  "cannot be checked", spec.first_line, 0, name)


_PROVIDED = frozenset({"torch", "math", "save"}) | SAFE_BUILTINS | FORBIDDEN_NAMES | CONSTANT_NAMES


def _blocks(fn: cst.FunctionDef) -> list[cst.With]:
    """The trace blocks of ``fn``, in order (what a job's block index counts)."""
    return [s for s in statements(fn) if isinstance(s, cst.With) and block_call(s) is not None]


def _in_helper(exc: ValidationError, name: str, spec: HelperSource) -> ValidationError:
    """``exc`` as an error of the helper ``name`` (its own file and line)."""
    out = ValidationError(f"{exc.reason} (in the helper `{name}`"
                          f"{f', {spec.filename}' if spec.filename else ''})",
                          exc.line, exc.col, exc.construct)
    out.filename = spec.filename or None
    return out


def _params_given_modules(fn: cst.FunctionDef, args: list) -> set[str]:
    """The parameters of ``fn`` that a call with ``args`` ((keyword, star, kind) each)
    may give a module (conservatively, for ``*``/``**`` arguments)."""
    p = fn.params
    positional = [x.name.value for x in (*p.posonly_params, *p.params)]
    keywords = {x.name.value for x in (*p.params, *p.kwonly_params)}
    star = p.star_arg.name.value if isinstance(p.star_arg, cst.Param) else None
    star_kw = p.star_kwarg.name.value if isinstance(p.star_kwarg, cst.Param) else None
    out: set[str] = set()
    at, unsure = 0, False  # after a `*` argument, positions are not known
    for kw, st, kind in args:
        envoy = kind == ENVOY
        if st == "*":
            unsure = True
            if envoy:
                out.update(positional[at:])
                out.update([star] if star else ())
        elif st == "**":
            if envoy:
                out.update(positional, keywords, [star_kw] if star_kw else ())
        elif kw is None:
            if envoy:
                if unsure:
                    out.update(positional[at:])
                    out.update([star] if star else ())
                elif at < len(positional):
                    out.add(positional[at])
                elif star:
                    out.add(star)
            at += 1
        elif envoy:
            out.add(kw if kw in keywords else star_kw or kw)
    return out


class _HelperChecker(_Checker):
    """Walks a helper's body with the block's rules, plus ``return`` of values; its
    parameters are values, or modules where ``envoy_params`` says a call gives one.
    Its decorators, defaults and annotations are not checked: the server never
    evaluates them (it builds the function from the compiled code alone, with the
    defaults sent as values)."""

    def __init__(self, positions, first_line, fn, free, module_names, helpers,
                 envoy_params) -> None:
        self.params = _params(fn)
        inside = self.params | {n for st in fn.body.body for n in _bound_names(st)}
        self._setup(positions, first_line, fn, inside, free, module_names, helpers - inside)
        self.call = self.model = self.tracer = self.item_index = None
        self.envoy_names = set(envoy_params)

    def run(self, strict: bool = True) -> None:
        """``strict``: refuse the first construct not allowed; else only find the
        calls of helpers (with what each argument is), refusing nothing."""
        self.strict = strict
        p = self.block.params
        for param in (*p.posonly_params, *p.params, *p.kwonly_params, p.star_arg, p.star_kwarg):
            if isinstance(param, cst.Param) and strict:
                self.bind_name(param.name, VALUE)  # not a name the server provides
        self.strict = False
        for _ in range(_MAX_PASSES):
            before = set(self.envoy_names)
            self._walk_with_recovery(self.block)
            if self.envoy_names == before:
                break
        else:
            self.strict = True
            self.refuse(self.block, "aliases", "the helper passes modules through too many "
                        f"variables (over {_MAX_PASSES} in a chain) to be checked: use the "
                        "module's path")
        self.calls = []
        self.recording = True
        if strict:
            self.strict = True
            self.body(self.block.body)
        else:
            self._walk_with_recovery(self.block)

    def small(self, node: cst.BaseSmallStatement) -> None:
        if not isinstance(node, cst.Return):
            super().small(node)
        elif node.value is not None and self.expr(node.value, envoy_ok=True) == ENVOY:
            self.refuse(node.value, _text(node.value), "a helper called from a remote block "
                        "returns values, not modules: return the module's `.output` (or "
                        "navigate to the module in the block)")


# -- remote sessions ---------------------------------------------------------------


class _SessionChecker(_Checker):
    """Walks a ``with model.session(...):`` sent as one job (``validate_session``): its
    body with the block rules (the plain Python between its traces included), each
    trace block of its model as a block (the header's arguments checked as a block's,
    its ``as`` name a tracer).  The session's own call is not checked: the server never
    evaluates it (it writes ``with model.session():`` itself)."""

    def __init__(self, positions, first_line, session, at, inside, free, module_names,
                 helpers) -> None:
        self._setup(positions, first_line, session, inside, free, module_names, helpers)
        self.session_call = self.call = session.items[at].item
        value = self.call.func.value
        self.model = value.value if isinstance(value, cst.Name) else None
        self.item_index = at
        self.tracer = None
        self.tracers = set()
        for s in statements(session):
            if isinstance(s, cst.With) and block_call(s) is not None:
                asname = s.items[block_item(s)].asname
                if asname is not None and isinstance(asname.name, cst.Name):
                    self.tracers.add(asname.name.value)

    def header(self, call: cst.Call) -> None:
        if call is not self.session_call:
            super().header(call)

    def with_stmt(self, node: cst.With, header: bool = False) -> None:
        call = block_call(node) if not header else None
        if call is None:
            return super().with_stmt(node, header)
        model = call.func.value
        if not (isinstance(model, cst.Name) and model.value == self.model):
            self.refuse(model, _text(model), f"a remote session runs blocks of its own model "
                        f"only (`{self.model}.{call.func.attr.value}(...)`)")
        if node.asynchronous is not None:
            self.refuse(node, "async with", "`async` is not allowed in remote blocks")
        at = block_item(node)
        outer, self.call = self.call, call
        try:
            for i, item in enumerate(node.items):
                if i == at:
                    self.header(call)
                    if item.asname is not None and not isinstance(item.asname.name, cst.Name):
                        self.refuse(item.asname, _text(item.asname), "a tracer is a plain name")
                    if item.asname is not None and item.asname.name.value in _PROVIDED | {
                            self.model}:
                        self.refuse(item.asname.name, item.asname.name.value, "is provided by "
                                    "the server: name the tracer otherwise")
                else:
                    self.with_item(item, False)
            self.body(node.body)
        finally:
            self.call = outer

    def name_kind(self, node: cst.Name, quiet: bool = False) -> str:
        if node.value in self.tracers and not node.value.startswith("__"):
            return TRACER
        return super().name_kind(node, quiet)


def validate_session(
    source: str,
    session_index: int,
    *,
    free_names: Collection[str],
    module_names: Collection[str] | None = None,
    first_line: int = 1,
    helpers: Mapping[str, HelperSource] | None = None,
) -> tuple[str, int, int]:
    """Refuse session ``session_index`` (``compiler.session.session_statements``) of
    the function in ``source`` unless its body and every trace block in it are allowed
    (the rules of ``validate_block``); return ``(model, first body line, last line)``,
    lines of the user's file."""
    from .session import session_item, session_statements

    if not isinstance(source, str) or not isinstance(session_index, int):
        raise ValidationError("a job needs its source text and a session number", first_line,
                              0, "source")
    helpers = _check_sent(free_names, helpers, first_line)
    _module, fn, positions = _parse_function(source, first_line)
    sessions = session_statements(fn)
    if not 0 <= session_index < len(sessions):
        raise ValidationError(
            f"session {session_index} does not exist: `{fn.name.value}` has {len(sessions)} "
            "session(s)", first_line, 0, "session index",
        )
    node = sessions[session_index]
    if not isinstance(node.body, cst.IndentedBlock) or not node.body.body:
        raise ValidationError("a remote session's body goes on its own lines",
                              first_line + positions[node][0] - 1, 0, "session")
    inside = _bound_names(node)
    names = None if module_names is None else frozenset(module_names)
    checker = _SessionChecker(positions, first_line, node, session_item(node), inside,
                              frozenset(free_names), names, frozenset(helpers) - inside)
    checker.run()
    if helpers:
        _check_helpers(helpers, checker.calls, names)
    return (checker.model or "", first_line + positions[node.body.body[0]][0] - 1,
            first_line + positions[node][2] - 1)
