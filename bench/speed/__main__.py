from bench.speed.cli import main

raise SystemExit(main())
