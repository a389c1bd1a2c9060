from mxfs.cli import main

raise SystemExit(main())
