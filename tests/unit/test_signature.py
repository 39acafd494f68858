"""Crash signatures from canned gdb backtraces (gdb 13, ``set print frame-info location-and-address``)."""

from __future__ import annotations

import pytest

from retracer.worker.coredump import Module
from retracer.worker.signature import (
    Frame,
    Mapping,
    address_signature,
    crash_signature,
    function_name,
    parse_frames,
    parse_mappings,
    top_functions,
)

#: An assert() in check(), called from main: glibc's abort path above it.
ASSERT_BT = """\
#0  0x00007ffff7e5feec in __pthread_kill_implementation (threadid=<optimized out>, signo=signo@entry=6, \
no_tid=no_tid@entry=0) at ./nptl/pthread_kill.c:44
        tid = <optimized out>
        ret = 0
#1  0x00007ffff7e5ff4f in __pthread_kill_internal (signo=6, threadid=<optimized out>) at ./nptl/pthread_kill.c:78
No locals.
#2  0x00007ffff7e10fb2 in __GI_raise (sig=sig@entry=6) at ../sysdeps/posix/raise.c:26
        ret = <optimized out>
#3  0x00007ffff7dfb472 in __GI_abort () at ./stdlib/abort.c:79
        save_stage = 1
#4  0x00007ffff7dfb395 in __assert_fail_base (fmt=0x7ffff7f70a90 "%s%s%s:%u: %s%sAssertion `%s' failed.\\n%n", \
assertion=assertion@entry=0x55555555600b "x > 3", file=file@entry=0x555555556004 "abrt.c", line=line@entry=8, \
function=function@entry=0x555555556011 <__PRETTY_FUNCTION__.0> "check") at ./assert/assert.c:94
        str = 0x5555555593c0 "YUUU\\005"
#5  0x00007ffff7e09ec2 in __GI___assert_fail (assertion=0x55555555600b "x > 3", file=0x555555556004 "abrt.c", \
line=8, function=0x555555556011 <__PRETTY_FUNCTION__.0> "check") at ./assert/assert.c:103
No locals.
#6  0x00005555555551da in check (x=1) at abrt.c:8
        __PRETTY_FUNCTION__ = "check"
#7  0x000055555555524b in main (argc=1, argv=0x7fffffffe7f8) at abrt.c:13
        t = 140737351849664
"""
#: A SIGSEGV caught by the program's handler, which aborts.
HANDLER_BT = """\
#0  0x00007ffff7e5feec in __pthread_kill_implementation (threadid=<optimized out>, signo=signo@entry=6, \
no_tid=no_tid@entry=0) at ./nptl/pthread_kill.c:44
#1  0x00007ffff7e5ff4f in __pthread_kill_internal (signo=6, threadid=<optimized out>) at ./nptl/pthread_kill.c:78
#2  0x00007ffff7e10fb2 in __GI_raise (sig=sig@entry=6) at ../sysdeps/posix/raise.c:26
#3  0x00007ffff7dfb472 in __GI_abort () at ./stdlib/abort.c:79
#4  0x0000555555555189 in handler (sig=11) at abrt.c:6
#5  <signal handler called>
No locals.
#6  0x00005555555551eb in deref (p=0x0) at abrt.c:9
#7  0x000055555555523f in main (argc=2, argv=0x7fffffffe7e8) at abrt.c:12
"""
#: No symbols for the program: libc's exported names only.
STRIPPED_BT = """\
#0  0x0000555555555155 in ?? ()
No symbol table info available.
#1  0x0000555555555185 in ?? ()
#2  0x00005555555551c4 in ?? ()
#3  0x00007ffff7dfc24a in ?? () from /lib/x86_64-linux-gnu/libc.so.6
#4  0x00007ffff7dfc305 in __libc_start_main () from /lib/x86_64-linux-gnu/libc.so.6
#5  0x0000555555555081 in ?? ()
"""
MAPPINGS = """\
Mapped address spaces:

          Start Addr           End Addr       Size     Offset objfile
      0x555555554000     0x555555555000     0x1000        0x0 /usr/bin/abrt
      0x555555555000     0x555555556000     0x1000     0x1000 /usr/bin/abrt
      0x7ffff7dd5000     0x7ffff7dfb000    0x26000        0x0 /usr/lib/x86_64-linux-gnu/libc.so.6
      0x7ffff7dfb000     0x7ffff7f51000   0x156000    0x26000 /usr/lib/x86_64-linux-gnu/libc.so.6
"""
EXE_ID, LIBC_ID, VDSO_ID = "aa" * 20, "bb" * 20, "cc" * 20
MODULES = [Module(0x555555554000, "/usr/bin/abrt", EXE_ID),
           Module(0x7FFFF7DD5000, "/usr/lib/x86_64-linux-gnu/libc.so.6", LIBC_ID),
           Module(0x7FFFF7FC8000, None, VDSO_ID)]


def shifted(text: str, exe_by: int, libc_by: int) -> str:
    """The same backtrace or mappings with the executable and libc loaded elsewhere (another ASLR draw)."""
    out = []
    for word in text.split(" "):
        if word.startswith("0x") and len(word) > 10:
            value = int(word, 16)
            value += exe_by if value < 0x600000000000 else libc_by
            word = f"{value:#018x}" if len(word) == 18 else hex(value)
        out.append(word)
    return " ".join(out)


def moved(modules: list[Module], exe_by: int, libc_by: int) -> list[Module]:
    return [Module(m.start + (exe_by if m.start < 0x600000000000 else libc_by), m.path, m.build_id)
            for m in modules]


class TestFrames:
    def test_frames_of_bt_full(self) -> None:
        frames = parse_frames(ASSERT_BT)
        assert [f.index for f in frames] == list(range(8))
        assert frames[0] == Frame(0, 0x7FFFF7E5FEEC, "__pthread_kill_implementation")
        assert frames[6] == Frame(6, 0x5555555551DA, "check")

    def test_signal_handler_and_unknown_frames(self) -> None:
        frames = parse_frames(HANDLER_BT)
        assert frames[5] == Frame(5, None, "<signal handler called>") and frames[5].signal_handler
        assert parse_frames(STRIPPED_BT)[3] == Frame(3, 0x7FFFF7DFC24A, "??")
        assert parse_frames(STRIPPED_BT)[4].function == "__libc_start_main"

    def test_frame_without_address(self) -> None:
        assert parse_frames("#0  read_value (t=0x0) at prog.c:5\n") == [Frame(0, None, "read_value")]

    @pytest.mark.parametrize(("rest", "name"), [
        ("std::vector<int, std::allocator<int> >::at (this=0x1, __n=2) at vector.h:3", "std::vector<int, "
         "std::allocator<int> >::at"),
        ("(anonymous namespace)::run (x=1) at a.cc:2", "(anonymous namespace)::run"),
        ("call<void (*)(int)> (f=0x1) at a.cc:3", "call<void (*)(int)>"),
        ("Widget::operator() (this=0x1) at w.cc:9", "Widget::operator()"),
        ("std::operator< <char> (a=..., b=...) at s.h:1", "std::operator< <char>"),
        ("foo(int) () from /lib/libfoo.so", "foo(int)"),
        ('show (s=0x1 "look (at) me") at x.c:1', "show"),
    ])
    def test_function_names(self, rest: str, name: str) -> None:
        assert function_name(rest) == name


class TestCrashSignature:
    def test_abort_machinery_is_skipped(self) -> None:
        assert crash_signature("/usr/bin/abrt", 6, parse_frames(ASSERT_BT)) == "/usr/bin/abrt:6:check:main"

    def test_frames_above_a_signal_handler_are_skipped(self) -> None:
        assert crash_signature("/usr/bin/abrt", 11, parse_frames(HANDLER_BT)) == "/usr/bin/abrt:11:deref:main"

    def test_top_five(self) -> None:
        bt = "".join(f"#{i}  0x{0x1000 + i:016x} in f{i} () at a.c:{i}\n" for i in range(9))
        assert crash_signature("/bin/a", 11, parse_frames(bt)) == "/bin/a:11:f0:f1:f2:f3:f4"

    def test_unknown_frame_gives_none(self) -> None:
        assert crash_signature("/bin/prog", 11, parse_frames(STRIPPED_BT)) is None
        bt = "#0  0x1000 in f () at a.c:1\n#1  0x2000 in ?? ()\n#2  0x3000 in main () at a.c:3\n"
        assert crash_signature("/bin/a", 11, parse_frames(bt)) is None

    def test_unknown_frame_below_the_top_five_is_fine(self) -> None:
        bt = "".join(f"#{i}  0x{0x1000 + i:016x} in f{i} () at a.c:{i}\n" for i in range(5))
        bt += "#5  0x0000000000002000 in ?? ()\n"
        assert crash_signature("/bin/a", 11, parse_frames(bt)) == "/bin/a:11:f0:f1:f2:f3:f4"

    def test_too_short_or_no_signal(self) -> None:
        one = parse_frames("#0  0x1000 in f () at a.c:1\n")
        assert crash_signature("/bin/a", 11, one) is None
        assert crash_signature("/bin/a", None, parse_frames(ASSERT_BT)) is None
        assert crash_signature("/bin/a", 11, []) is None

    def test_cpu_specific_string_functions_are_skipped(self) -> None:
        bt = ("#0  0x1000 in __strlen_sse2 () from /lib/libc.so.6\n#1  0x2000 in parse () at p.c:1\n"
              "#2  0x3000 in main () at p.c:9\n")
        assert [f.function for f in top_functions(parse_frames(bt))] == ["parse", "main"]


class TestAddressSignature:
    def test_offsets_within_modules(self) -> None:
        mappings = parse_mappings(MAPPINGS)
        assert mappings[0] == Mapping(0x555555554000, 0x555555555000, "/usr/bin/abrt")
        signature = address_signature(parse_frames(ASSERT_BT), MODULES, mappings)
        assert signature is not None
        parts = signature.split(":")
        assert parts[0] == f"{LIBC_ID}+{0x7FFFF7E5FEEC - 0x7FFFF7DD5000:#x}"
        assert parts[6:] == [f"{EXE_ID}+0x11da", f"{EXE_ID}+0x124b"]

    def test_same_under_another_layout(self) -> None:
        """The same crash with the executable and libc loaded elsewhere gives the same address signature."""
        first = address_signature(parse_frames(ASSERT_BT), MODULES, parse_mappings(MAPPINGS))
        exe_by, libc_by = 0x1234000, -0x5678000
        second = address_signature(parse_frames(shifted(ASSERT_BT, exe_by, libc_by)),
                                   moved(MODULES, exe_by, libc_by),
                                   parse_mappings(shifted(MAPPINGS, exe_by, libc_by)))
        assert first == second

    def test_symbols_do_not_change_it(self) -> None:
        """With or without names, the same addresses give the same signature."""
        named = "#0  0x0000555555555155 in read_value (t=0x0) at p.c:5\n#1  0x00007ffff7dfc24a in start () at s.c:1\n"
        unnamed = "#0  0x0000555555555155 in ?? ()\n#1  0x00007ffff7dfc24a in ?? () from /lib/libc.so.6\n"
        mappings = parse_mappings(MAPPINGS)
        assert address_signature(parse_frames(named), MODULES, mappings) == \
            address_signature(parse_frames(unnamed), MODULES, mappings) == \
            f"{EXE_ID}+0x1155:{LIBC_ID}+{0x7FFFF7DFC24A - 0x7FFFF7DD5000:#x}"

    def test_below_the_signal_handler_and_in_the_vdso(self) -> None:
        bt = ("#0  0x00007ffff7fc8a10 in clock_gettime ()\n#1  <signal handler called>\n"
              "#2  0x00007ffff7fc8b20 in ?? ()\n#3  0x0000555555555155 in f ()\n")
        assert address_signature(parse_frames(bt), MODULES, parse_mappings(MAPPINGS)) == \
            f"{VDSO_ID}+0xb20:{EXE_ID}+0x1155"

    def test_address_in_no_module_gives_none(self) -> None:
        bt = "#0  0x00007fffe0001000 in ?? ()\n#1  0x0000555555555155 in f ()\n"
        assert address_signature(parse_frames(bt), MODULES, parse_mappings(MAPPINGS)) is None

    def test_at_most_ten_frames_and_low_addresses_skipped(self) -> None:
        bt = "#0  0x0000000000000000 in ?? ()\n"
        bt += "".join(f"#{i}  0x{0x555555555000 + i:016x} in f{i} ()\n" for i in range(1, 15))
        signature = address_signature(parse_frames(bt), MODULES, parse_mappings(MAPPINGS))
        assert signature is not None and len(signature.split(":")) == 10
        assert signature.startswith(f"{EXE_ID}+0x1001:")

    def test_mappings_with_permissions_column(self) -> None:
        text = "      0x400000   0x401000   0x1000   0x0  r-xp   /usr/bin/my prog\n" \
               "      0x402000   0x403000   0x1000   0x0  rw-p   \n"
        assert parse_mappings(text) == [Mapping(0x400000, 0x401000, "/usr/bin/my prog")]
