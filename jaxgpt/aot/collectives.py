"""Bytes a compiled program moves between devices, read from its optimized HLO text.

Counts the collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
collective-permute, synchronous or as an async `-start`) of one while loop's body: each
one's bytes per device are the larger of its operands and its result (what a device
sends or ends up holding), and a loop nested in the body (the scan over layers) counts
its trip count times. `decode_step_bytes` applies it to the sampler's per-token loop,
found by its op name scope (`sampling.DECODE_LOOP`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from jaxgpt.train.metrics import human_bytes

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')

_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
             'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ')
_CALLED = re.compile(
    r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (an array or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _ITEMSIZE:
      total += _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _split_type(rest: str) -> tuple[str, str]:
  """(result type, the text after it) of an instruction's right-hand side."""
  if not rest.startswith('('):
    head, _, tail = rest.partition(' ')
    return head, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  return rest, ''


@dataclasses.dataclass
class _Instruction:
  name: str
  opcode: str
  result_bytes: int
  operands: list[str]
  line: str


def _parse(hlo_text: str) -> dict[str, list[_Instruction]]:
  """Computation name -> its instructions."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = computations.setdefault(head.group(1), [])
      continue
    inst = _INSTRUCTION.match(line)
    if inst is None or current is None:
      continue
    result, rest = _split_type(line[inst.end():])
    opcode, _, args = rest.partition('(')
    args = args.split(')', 1)[0]  # the operand list: names, possibly with their types
    operands = re.findall(r'%([\w.\-]+)', args)
    current.append(_Instruction(inst.group(1), opcode.strip(), _bytes(result), operands, line))
  return computations


@dataclasses.dataclass
class Collectives:
  """Bytes per device and op counts, by collective kind."""
  bytes_by_kind: dict[str, float] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))
  count_by_kind: dict[str, float] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes_by_kind.values())

  def add(self, other: Collectives, times: float = 1.0) -> None:
    for kind, b in other.bytes_by_kind.items():
      self.bytes_by_kind[kind] += times * b
      self.count_by_kind[kind] += times * other.count_by_kind[kind]


class _Program:
  def __init__(self, hlo_text: str):
    self.computations = _parse(hlo_text)
    self._memo: dict[str, Collectives] = {}

  def collectives(self, name: str) -> Collectives:
    """Of computation `name` and everything it calls, loops times their trip counts."""
    if name in self._memo:
      return self._memo[name]
    out = Collectives()
    self._memo[name] = out  # (HLO has no recursion; this only guards the parse)
    instructions = self.computations.get(name, [])
    result_bytes = {i.name: i.result_bytes for i in instructions}
    for inst in instructions:
      kind = inst.opcode.removesuffix('-start')
      if kind in KINDS:
        operand_bytes = sum(result_bytes.get(o, 0) for o in inst.operands)
        result = inst.result_bytes
        if inst.opcode.endswith('-start') and inst.line.split('=', 1)[1].lstrip()[0] == '(':
          result -= operand_bytes  # an async start's tuple repeats its operands
        out.bytes_by_kind[kind] += max(operand_bytes, result)
        out.count_by_kind[kind] += 1
      called = _CALLED.findall(inst.line)
      branches = _BRANCHES.search(inst.line)
      if inst.opcode == 'while':
        trips = _TRIP_COUNT.search(inst.line)
        for c in called:
          out.add(self.collectives(c), int(trips.group(1)) if trips else 1)
      elif branches:  # a conditional runs one branch: count the costliest
        options = [self.collectives(b.strip().lstrip('%')) for b in branches.group(1).split(',')]
        out.add(max(options, key=lambda c: c.total_bytes))
      else:
        for c in called:
          out.add(self.collectives(c))
    return out

  def loop_bodies(self, scope: str) -> list[str]:
    """Bodies of the while loops whose op name ends in `scope`/while."""
    out = []
    for instructions in self.computations.values():
      for inst in instructions:
        op_name = _OP_NAME.search(inst.line)
        if inst.opcode == 'while' and op_name and op_name.group(1).endswith(f'{scope}/while'):
          out += re.findall(r'\bbody=%?([\w.\-]+)', inst.line)
    return out


def loop_body_collectives(hlo_text: str, scope: str) -> Collectives | None:
  """Collectives of one iteration of the while loop traced under `jax.named_scope(scope)`;
  None when the program has no such loop."""
  program = _Program(hlo_text)
  bodies = program.loop_bodies(scope)
  if not bodies:
    return None
  out = Collectives()
  for body in dict.fromkeys(bodies):  # XLA may keep a copy of the loop (e.g. peeled)
    step = program.collectives(body)
    if step.total_bytes >= out.total_bytes:
      out = step
  return out


def decode_step_bytes(compiled) -> Collectives | None:
  """Collectives of one decode step of a compiled `sampling.decode_fn` program."""
  from jaxgpt.inference import sampling  # pylint: disable=import-outside-toplevel
  return loop_body_collectives(compiled.as_text(), sampling.DECODE_LOOP)


def describe(c: Collectives) -> str:
  """e.g. '1.2 GiB (all-gather 1.2 GiB in 291 ops, all-reduce 64.0 KiB in 65 ops)'."""
  parts = [f'{k} {human_bytes(c.bytes_by_kind[k])} in {c.count_by_kind[k]:.0f} ops'
           for k in KINDS if c.count_by_kind.get(k)]
  return f"{human_bytes(c.total_bytes)} ({', '.join(parts) or 'none'})"
