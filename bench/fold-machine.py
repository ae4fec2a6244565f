"""Whole-machine perf samples -> folded stacks for inferno-flamegraph.

How bench/flamegraph-machine-postgres-half-*.svg were made: a release
service on a throwaway Postgres (the bench's settings), one phase of
`cargo bench --bench load -- --probe ADDR post RATE` at half its closed-loop
maximum, and during it

    perf record -a -g -F 499 -o perf.data -- sleep 5
    perf script -i perf.data -F comm,pid,tid,ip,sym \
      | python3 bench/fold-machine.py SERVICE_PID LOAD_PID \
      | inferno-flamegraph --minwidth 2 --width 1400 > out.svg

Roots: the service, the load client, Postgres's backends, idle. Under
Postgres a second frame says which part of a statement the sample is in.
Debian's postgres binary exports few symbols: ExecModifyTable's call sites
into the (static) INSERT and UPDATE paths are told apart by address, and
those two addresses hold for the PostgreSQL 15 binary on these machines
only (read off stacks that end in heap_insert and heap_update)."""
import sys, collections
svc_pid, load_pid = sys.argv[1], sys.argv[2]
out = collections.Counter(); frames = []; head = None
def cls(syms, addrs):
    if '3284e5' in addrs: return 'executor: UPDATE'
    if '328338' in addrs: return 'executor: INSERT'
    s = set(syms)
    if 'PortalRun' in s: return 'executor: start, scans, finish'
    if s & {'exec_parse_message', 'pg_parse_query', 'pg_analyze_and_rewrite_fixedparams', 'pg_plan_queries', 'planner', 'standard_planner', 'exec_bind_message', 'GetCachedPlan'}: return 'parse, plan, bind'
    if s & {'CommitTransactionCommand', 'CommitTransaction', 'XLogFlush', 'StartTransactionCommand'}: return 'begin, commit'
    if s & {'pq_getbyte', 'pq_getmessage', 'secure_read', 'pq_flush', 'socket_flush', 'secure_write', 'WaitEventSetWait', 'ReadCommand', '__send', '__recv', '__libc_recv', '__libc_send', 'epoll_wait'}: return 'client protocol, socket'
    return 'other'
def flush():
    if head is None: return
    comm, pid = head
    st = [(a, s) for a, s in reversed(frames)]  # root first
    syms = [s for _, s in st]; addrs = [a for a, _ in st]
    names = [s if s != '[unknown]' else f'[{a}]' for a, s in st]
    if comm == 'postgres':
        root = ['postgres (all backends)', cls(syms, addrs)]
    elif comm == 'swapper':
        root = ['idle']; names = []
    elif pid == svc_pid:
        root = ['reliability-lab']
    elif pid == load_pid:
        root = ['load client']
    else:
        root = [f'{comm}']
    out[';'.join(root + names)] += 1
for line in sys.stdin:
    line = line.rstrip('\n')
    if not line:
        flush(); frames = []; head = None; continue
    if not line.startswith('\t'):
        p = line.split()
        head = (p[0], p[1].split('/')[0]); continue
    p = line.split(None, 2)
    if len(p) >= 2: frames.append((p[0], p[1].split('+')[0]))
flush()
for k, v in out.items():
    print(k, v)
