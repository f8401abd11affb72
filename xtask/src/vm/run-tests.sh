# Guest-side runner for `cargo xtask vm-test`: runs every DIR/*.sh in name order in this one
# boot (boots are expensive under TCG), reports each script's result, exits 0 iff all passed.
# usage: sh run-tests.sh DIR [FILTER]   (FILTER: substring of the script name)
# Each script must be executable (its shebang picks the shell); it runs with cwd = the
# repository, stdin /dev/null, CORA_VM_TEST_TMP = a fresh empty directory on the guest tmpfs.
# A script running past CORA_VM_TEST_SCRIPT_TIMEOUT seconds (default 1200) is killed and fails.
dir=$1
filter=${2:-}
repo=$(cd "$dir/../.." && pwd)
passed=0
failed=0
failed_names=
limit=${CORA_VM_TEST_SCRIPT_TIMEOUT:-1200}
now() { cut -d' ' -f1 /proc/uptime; }
for t in "$dir"/*.sh; do
    [ -e "$t" ] || continue
    name=${t##*/}
    case $name in *"$filter"*) ;; *) continue ;; esac
    echo "vm-test: RUN  $name"
    start=$(now)
    if [ ! -x "$t" ]; then
        echo "vm-test: $name is not executable (chmod +x it; its shebang picks the shell)"
        rc=126
    else
        tmp=$(mktemp -d /tmp/vm-test.XXXXXX)
        # TERM first so the script's traps stop its services; KILL 30 s later if that hangs.
        (cd "$repo" && CORA_VM_TEST_TMP=$tmp CORA_REPO=$repo timeout -k 30 "$limit" "$t" </dev/null)
        rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "vm-test: $name ran past its ${limit} s limit"
        fi
        rm -rf "$tmp"
    fi
    secs=$(awk "BEGIN { printf \"%.1f\", $(now) - $start }")
    if [ "$rc" -eq 0 ]; then
        echo "vm-test: PASS $name (${secs} s)"
        passed=$((passed + 1))
    else
        echo "vm-test: FAIL $name (exit $rc, ${secs} s)"
        failed=$((failed + 1))
        failed_names="$failed_names $name"
    fi
done
if [ $((passed + failed)) -eq 0 ]; then
    echo "vm-test: no scripts in $dir matched '$filter'"
    exit 1
fi
echo "vm-test: $passed passed, $failed failed${failed_names:+:$failed_names}"
[ "$failed" -eq 0 ]
