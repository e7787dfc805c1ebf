Seq	Host	Starttime	JobRuntime	Send	Receive	Exitval	Signal	Command
1	:	1796175135.821	     0.010	0	0	4	0	echo try >> count1; exit 4
2	:	1796175136.530	     0.041	0	2	0	0	echo b
3	:	1796175136.543	     0.028	0	2	0	0	echo c
4	:	1796175136.556	     0.028	0	2	0	0	echo d
5	:	1796175136.573	     0.010	0	2	0	0	echo e
1	:	1796175137.086	     0.012	0	2	0	0	echo a
