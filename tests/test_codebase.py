"""What a reader of the code relies on: each stage's step in its own script, utils.py holding what two stages share,
model.py standing alone, no stage importing another, short functions, and names in docstrings and comments that
resolve."""
import ast
import io
import os
import re
import tokenize

import model as M
import utils as U
from conftest import ROOT, small_config

STAGES = ('prepare', 'train', 'sft', 'eval', 'analyze', 'bench', 'sample', 'export')


def source(name):
    with open(os.path.join(ROOT, f'{name}.py')) as f:
        return f.read()


def imported_modules(text):
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split('.')[0])
    return names


def test_no_stage_imports_another_and_model_py_imports_none_of_ours():
    for stage in STAGES:
        assert not imported_modules(source(stage)) & set(STAGES), stage
    assert not imported_modules(source('model')) & {*STAGES, 'utils', 'configurator'}
    assert not imported_modules(source('utils')) & set(STAGES)


def test_train_and_sft_show_their_step():
    """nanoGPT's reading: the forward, the backward, the clip and the update are in the stage script's own loop."""
    for stage in ('train', 'sft'):
        main = next(node for node in ast.parse(source(stage)).body
                    if isinstance(node, ast.FunctionDef) and node.name == 'main')
        loop = ast.unparse(next(node for node in ast.walk(main) if isinstance(node, (ast.For, ast.While))))
        schedule = 'learning_rate_at(' if stage == 'train' else 'cosine_lr('  # train.py's: cosine_lr, re-planned
        for step in ('loss_engine(x, y, cu_seqlens, max_seqlen)', '.backward(', 'clip_grad_norm_(', 'optimizer.step()',
                     'loss_engine.step()', schedule, 'save('):
            assert step in loop, (stage, step)


def test_utils_holds_only_what_two_stages_use():
    """Every function of utils.py is used by at least two stage scripts, directly or through another of its functions:
    a stage's own machinery stays in that stage (model.py's placement rule)."""
    text = source('utils')
    functions = {node.name: ast.unparse(node) for node in ast.parse(text).body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    users = {name: {s for s in STAGES if re.search(rf'\b{name}\b', source(s))} for name in functions}
    for _ in functions:  # the users of a function that calls `name` use `name` too
        for name in functions:
            for caller, body in functions.items():
                if caller != name and re.search(rf'\b{name}\b', body):
                    users[name] |= users[caller]
    assert {name: sorted(found) for name, found in users.items() if len(found) < 2} == {}


def test_only_wrap_model_patches_a_module_and_functions_are_short():
    """How the frozen classes compute changes in one place, model.wrap_model: no stage assigns a module's forward.
    Every function of a stage script, but its main (the stage's outline), fits a reader's screen (60 lines)."""
    long_functions = []
    for stage in STAGES:
        tree = ast.parse(source(stage))
        assert not re.search(r'\.forward = ', source(stage)), stage
        for node in ast.walk(tree):  # functions and methods (a class is as long as its methods need)
            if isinstance(node, ast.FunctionDef) and node.name != 'main':
                if node.end_lineno - node.lineno + 1 > 60:
                    long_functions.append(f'{stage}.py: {node.name} ({node.end_lineno - node.lineno + 1} lines)')
    assert long_functions == []


def test_names_in_docstrings_and_comments_resolve():
    """Every `model.x` and `utils.x` a stage script's docstrings and comments name exists: in the module, or (for
    `model.`) on a model, the name the scripts give their PolychromaticLM."""
    instance = M.PolychromaticLM(small_config())
    unresolved = []
    for stage in STAGES + ('model', 'utils', 'configurator'):
        text = source(stage)
        prose = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
        prose += [ast.get_docstring(node) or '' for node in ast.walk(ast.parse(text))
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))]
        for module, name in re.findall(r'\b(model|utils)\.([A-Za-z_]\w*)', '\n'.join(prose)):
            if name in ('py', 'safetensors', 'pt'):  # a file name
                continue
            found = hasattr(U, name) if module == 'utils' else hasattr(M, name) or hasattr(instance, name)
            if not found:
                unresolved.append(f'{stage}.py: {module}.{name}')
    assert unresolved == []
