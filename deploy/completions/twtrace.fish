# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_twtrace_global_optspecs
	string join \n h/help V/version
end

function __fish_twtrace_needs_command
	# Figure out if the current invocation already has a command.
	set -l cmd (commandline -opc)
	set -e cmd[1]
	argparse -s (__fish_twtrace_global_optspecs) -- $cmd 2>/dev/null
	or return
	if set -q argv[1]
		# Also print the command, so this can be used to figure out what it is.
		echo $argv[1]
		return 1
	end
	return 0
end

function __fish_twtrace_using_subcommand
	set -l cmd (__fish_twtrace_needs_command)
	test -z "$cmd"
	and return 1
	contains -- $cmd[1] $argv
end

complete -c twtrace -n "__fish_twtrace_needs_command" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_needs_command" -s V -l version -d 'Print version'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "watch" -d 'Stream TIME_WAIT births and deaths (and, with --all-states, every TCP transition)'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "report" -d 'Collect for a while, then print who makes the TIME_WAIT (table or JSON)'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "top" -d 'Full-screen live view of who makes the TIME_WAIT'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "serve" -d 'Run as a daemon: Prometheus metrics, a JSON API and a health check over HTTP'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "exec" -d 'Run a command and count the TIME_WAIT its process tree causes; fail it over a budget'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "doctor" -d 'Watch for a while, then say what is wrong and what to change (exit 9 on a problem)'
complete -c twtrace -n "__fish_twtrace_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l port -d 'Only connections with this local or remote port (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l peer -d 'Only connections whose remote address is in this network (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l pid -d 'Only sockets owned by this process id (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l comm -d 'Only sockets owned by a process with this exact name (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l duration -d 'Stop after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l time -d 'Text time format: clock (HH:MM:SS.mmm, the default), iso (ISO 8601 with the date and the UTC offset) or epoch (seconds since 1970, for scripts)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -s 4 -l ipv4 -d 'Only IPv4 (v4-mapped IPv6 counts as IPv4)'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -s 6 -l ipv6 -d 'Only IPv6'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l json -d 'One JSON object per line'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l all-states -d 'Also stream every TCP state transition, with its owner where known'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l new-only -d 'Leave out the ends of TIME_WAIT sockets born before twtrace started'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -l utc -d 'Text times in UTC (default: local time, from TZ or /etc/localtime, like date(1))'
complete -c twtrace -n "__fish_twtrace_using_subcommand watch" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l port -d 'Only connections with this local or remote port (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l peer -d 'Only connections whose remote address is in this network (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l pid -d 'Only sockets owned by this process id (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l comm -d 'Only sockets owned by a process with this exact name (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l by -d 'Group by: service (destination for connections out, port for connections in), peer, port, process or netns (each group belongs to one network namespace); for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l sort -d 'Sort by: tw (TIME_WAIT now), rate (births/s over 10 s) or births; for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l max-groups -d 'Groups kept per grouping before the smallest are folded into \'other\' (memory bound)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l duration -d 'How long to collect (default 30s; with --interval, until Ctrl-C)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l interval -d 'Print a report every DURATION, each about that interval (births since the last one; TIME_WAIT now), like vmstat; with --json, one JSON document per line' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l top -d 'Show the N largest groups' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l output -d 'Write the report to FILE instead of standard output (each --interval report appended)' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -s 4 -l ipv4 -d 'Only IPv4 (v4-mapped IPv6 counts as IPv4)'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -s 6 -l ipv6 -d 'Only IPv6'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -l json -d 'Print JSON instead of a table'
complete -c twtrace -n "__fish_twtrace_using_subcommand report" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l port -d 'Only connections with this local or remote port (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l peer -d 'Only connections whose remote address is in this network (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l pid -d 'Only sockets owned by this process id (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l comm -d 'Only sockets owned by a process with this exact name (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l by -d 'Group by: service (destination for connections out, port for connections in), peer, port, process or netns (each group belongs to one network namespace); for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l sort -d 'Sort by: tw (TIME_WAIT now), rate (births/s over 10 s) or births; for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l max-groups -d 'Groups kept per grouping before the smallest are folded into \'other\' (memory bound)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -s 4 -l ipv4 -d 'Only IPv4 (v4-mapped IPv6 counts as IPv4)'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -s 6 -l ipv6 -d 'Only IPv6'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand top" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l port -d 'Only connections with this local or remote port (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l peer -d 'Only connections whose remote address is in this network (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l pid -d 'Only sockets owned by this process id (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l comm -d 'Only sockets owned by a process with this exact name (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l by -d 'Group by: service (destination for connections out, port for connections in), peer, port, process or netns (each group belongs to one network namespace); for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l sort -d 'Sort by: tw (TIME_WAIT now), rate (births/s over 10 s) or births; for serve, the default of /api/v1/report' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l max-groups -d 'Groups kept per grouping before the smallest are folded into \'other\' (memory bound)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l listen -d 'Address to listen on (loopback unless told otherwise; :PORT is every address)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l log-level -d 'What to log on stderr: error, warn (also each failed request: one line per failed scrape or refused query), info (also start and stop) or debug (also every request)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l user -d 'Unprivileged user to run as once the probes are attached' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l max-series -d 'Keys exported per grouping as metric series (the rest is summed into key="other")' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -s 4 -l ipv4 -d 'Only IPv4 (v4-mapped IPv6 counts as IPv4)'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -s 6 -l ipv6 -d 'Only IPv6'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand serve" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l max-timewait -d 'Fail (exit 124) when the command causes more than N TIME_WAIT sockets' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l max-rate -d 'Fail (exit 124) when the command causes more than R TIME_WAIT births in one second' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l summary -d 'Write the summary to FILE instead of standard error (apart from the command\'s output)' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -l json -d 'Print the summary as one JSON line'
complete -c twtrace -n "__fish_twtrace_using_subcommand exec" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l ring-size -d 'Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs up to twice its size in memory)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l stats-json -d 'At the end, write what twtrace cost and saw (kernel counters, per-program run time and recursion misses, events received) to this file as JSON' -r -F
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l netns -d 'Only this network namespace: an inode number (as `lsns -t net` shows), a name under /run/netns, or pid:PID for a process\'s (repeatable)' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l duration -d 'How long to watch the traffic' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l fail-on -d 'Exit 9 when a finding is at least this severe: warning (warning or critical), critical, or never' -r
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l hooks-only -d 'Attach programs that return at once, on the same hooks, and trace nothing: what the hooks alone cost (the benchmark\'s floor)'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l debug-kernel -d 'Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -s v -l verbose -d 'When the kernel refuses a program, print the verifier\'s whole log'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l typed-only -d 'Load the programs as under lockdown=confidentiality: typed loads only, no bpf_probe_read_kernel (for the tests, on kernels without that lockdown)'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -l json -d 'Print JSON instead of text'
complete -c twtrace -n "__fish_twtrace_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "watch" -d 'Stream TIME_WAIT births and deaths (and, with --all-states, every TCP transition)'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "report" -d 'Collect for a while, then print who makes the TIME_WAIT (table or JSON)'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "top" -d 'Full-screen live view of who makes the TIME_WAIT'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "serve" -d 'Run as a daemon: Prometheus metrics, a JSON API and a health check over HTTP'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "exec" -d 'Run a command and count the TIME_WAIT its process tree causes; fail it over a budget'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "doctor" -d 'Watch for a while, then say what is wrong and what to change (exit 9 on a problem)'
complete -c twtrace -n "__fish_twtrace_using_subcommand help; and not __fish_seen_subcommand_from watch report top serve exec doctor help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
