"""Read compiled GPU code without a GPU: ptxas's resource log, a cubin's resource usage, SASS (from cuobjdump)
and the steady loop.

The steady loop of an attention kernel is the loop over key (or query) tiles that runs once per block of
scores. In SASS a loop is a backward branch: the instructions from its target up to the branch are its
body (unless they hold an unconditional EXIT: then the branch comes back from out-of-line code after the
kernel's end).
The steady loop is the loop holding the most MMA instructions (HGMMA or HMMA) among the loops that hold
MMA instructions and contain no smaller loop that also holds some (a spin-wait on an mbarrier inside it is
a loop without MMA, so it does not disqualify it); on a tie, the shortest (the mask-free full-tile loop
comes out ahead of the masked edge loop, which does the same MMA work with more instructions).

Its length is counted two ways: the whole body, and the shortest path through it that still executes
every MMA instruction of the body (forward branches may skip code, such as a mask applied only on edge
tiles, but not an MMA). The path is what a mask-free tile runs where the compiler branches around the
masking; where it predicates instead, both counts agree.

Limits: a loop the compiler unrolled counts as one body holding several tiles (its MMA count shows it);
a spin-wait inside the body is counted once, as if it never spun; a branch taken only on rare tiles that
skips non-MMA work (say, a rescale) is taken by the path as if it always were.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

MMA_OPCODES = ("HGMMA", "HMMA")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMAREDG")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_BRANCH = re.compile(r"\bBRA\b[^;]*?\b(0x[0-9a-f]+)\b")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # base opcode, modifiers dropped: "HGMMA", "BRA"
    text: str

    @property
    def branch_target(self) -> int | None:
        match = _BRANCH.search(self.text)
        return int(match.group(1), 16) if match else None


@dataclass(frozen=True)
class Loop:
    start: int  # address of the branch target (first instruction of the body)
    end: int  # address of the backward branch (last instruction of the body)
    body: tuple[Instruction, ...]

    @property
    def mma(self) -> int:
        return sum(instruction.opcode in MMA_OPCODES for instruction in self.body)

    @property
    def path(self) -> int:
        """Instructions on the shortest path from the body's first instruction to its back branch that
        executes every MMA instruction (forward branches inside the body only)."""
        index = {instruction.address: position for position, instruction in enumerate(self.body)}
        is_mma = [instruction.opcode in MMA_OPCODES for instruction in self.body]
        mma_before = [0]
        for flag in is_mma:
            mma_before.append(mma_before[-1] + flag)
        distance = [0] + [len(self.body) + 1] * (len(self.body) - 1)  # instructions run up to and including i
        for position, instruction in enumerate(self.body[:-1]):
            if distance[position] > len(self.body):
                continue
            target = instruction.branch_target
            successors = [] if instruction.opcode == "EXIT" or _unconditional(instruction) else [position + 1]
            if target in index and index[target] > position and mma_before[index[target]] == mma_before[position + 1]:
                successors.append(index[target])
            for successor in successors:
                distance[successor] = min(distance[successor], distance[position] + 1)
        return distance[-1] + 1 if distance[-1] <= len(self.body) else len(self.body)

    def contains(self, other: Loop) -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def _unconditional(instruction: Instruction) -> bool:
    """A branch without a predicate guard (or guarded by the always-true PT): no fall-through."""
    return instruction.opcode == "BRA" and not re.match(r"@!?U?P[0-6]\b", instruction.text)


def opcode_of(text: str) -> str:
    """The base opcode of one SASS instruction's text, after any predicate guard (``@!P0``)."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Instructions per function of ``cuobjdump -sass`` output."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = functions.setdefault(function.group(1), [])
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            body = instruction.group(2)
            current.append(Instruction(int(instruction.group(1), 16), opcode_of(body), body))
    return functions


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every backward branch's loop. Not loops: a branch to itself (the end-of-kernel trap), and a branch
    back from out-of-line code that ptxas places after the kernel's exit (an mbarrier wait's retry path,
    say), whose span holds an unconditional EXIT."""
    found = []
    for branch in instructions:
        target = branch.branch_target
        if target is not None and target < branch.address:
            body = tuple(i for i in instructions if target <= i.address <= branch.address)
            if not any(instruction.opcode == "EXIT" and not instruction.text.startswith("@") for instruction in body):
                found.append(Loop(target, branch.address, body))
    return found


def steady_loop(instructions: list[Instruction]) -> Loop | None:
    """The loop the module docstring defines, or None when no loop holds an MMA instruction."""
    with_mma = [loop for loop in loops(instructions) if loop.mma]
    innermost = [loop for loop in with_mma if not any(loop.contains(other) for other in with_mma)]
    if not innermost:
        return None
    return min(innermost, key=lambda loop: (-loop.mma, len(loop.body), loop.start))


@dataclass(frozen=True)
class SassFeatures:
    wgmma: int  # HGMMA instructions
    mma_sync: int  # HMMA instructions
    tma: bool  # a bulk tensor copy (UTMALDG, UBLKCP, ...)
    setmaxnreg: bool  # USETMAXREG: warpgroups with register budgets of their own (warp specialization)


def sass_features(instructions: list[Instruction]) -> SassFeatures:
    counts = Counter(instruction.opcode for instruction in instructions)
    tma = any(counts[opcode] for opcode in TMA_OPCODES)
    return SassFeatures(counts["HGMMA"], counts["HMMA"], tma, counts["USETMAXREG"] > 0)


@dataclass(frozen=True)
class PtxasEntry:
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int  # static shared memory ptxas reports (dynamic shared memory is set at launch)


def parse_ptxas_log(log: str) -> dict[tuple[str, str], PtxasEntry]:
    """``-Xptxas -v`` / ``ptxas -v`` log -> {(function, arch): entry}."""
    entries: dict[tuple[str, str], PtxasEntry] = {}
    key, values = None, {}
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if entry:
            key, values = (entry.group(1), entry.group(2)), {}
            continue
        if key is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            stack, stores, loads = map(int, frame.groups())
            values.update(stack=stack, spill=stores + loads)
        used = re.search(r"Used (\d+) registers", line)
        if used:
            shared = re.search(r"(\d+) bytes smem", line)
            entries[key] = PtxasEntry(
                int(used.group(1)),
                values.get("spill", 0),
                values.get("stack", 0),
                int(shared.group(1)) if shared else 0,
            )
    return entries


def parse_resource_usage(text: str) -> dict[str, PtxasEntry]:
    """``cuobjdump -res-usage`` of a cubin -> {function: entry}: what the binary itself records, whatever
    flags built it. A cubin keeps its stack frame, not ptxas's spill byte counts, so ``spill_bytes`` is
    the frame too (our kernels hold no local arrays: a frame is spilled registers)."""
    entries = {}
    for function, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
        stack = int(values["STACK"]) + int(values.get("LOCAL", 0))
        entries[function] = PtxasEntry(int(values["REG"]), stack, stack, int(values.get("SHARED", 0)))
    return entries
