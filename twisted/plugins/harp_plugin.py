"""twistd plugin: ``twistd -n harp`` runs HaRP, configured by environment variables."""

from __future__ import annotations

import os

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    """No options: HaRP is configured only through ``HP_*`` environment variables."""

    longdesc = "Configured by environment variables; see README.md."


@implementer(IServiceMaker, IPlugin)
class HarpServiceMaker:
    tapname = "harp"
    description = "HaRP: AppAPI reverse proxy, FRP server and Docker engine gateway"
    options = Options

    def makeService(self, options: Options) -> IService:
        # Imported here so that twistd's plugin scan stays cheap and import errors
        # surface only when HaRP is actually started.
        from harp.service import make_service_from_env

        service: IService = make_service_from_env(os.environ)  # type: ignore[assignment]
        return service


serviceMaker = HarpServiceMaker()
