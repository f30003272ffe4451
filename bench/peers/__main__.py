from bench.peers import main

raise SystemExit(main())
