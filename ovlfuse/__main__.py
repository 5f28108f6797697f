from ovlfuse.cli import main

raise SystemExit(main())
